"""The GPU dispatch table (slmfast/gpu_table.py) with a fake table, and the ops' native paths.

Runs on the CPU: the choice for CUDA calls needs only a torch.device("cuda") object (no GPU), with
the card's compute capability faked; the native paths (SDPA, F.rms_norm, F.layer_norm) are called
directly on CPU tensors and compared with the fp64 references (docs/architecture.md §5).
"""

import json

import pytest
import torch

from slmfast import backends, cli, gpu_table
from slmfast.functional import attention, rms_norm
from slmfast.ops import attention as attention_op
from slmfast.ops.attention import attention_native, attention_reference
from slmfast.ops.layer_norm import layer_norm_native, layer_norm_reference
from slmfast.ops.rms_norm import rms_norm_native, rms_norm_reference
from tests.helpers import assert_close, value_and_grads

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
MEASURED = {"date": "2026-12-04", "card": "Fake H200", "capability": [9, 0], "torch": "2.11.0",
            "triton": "3.6.0", "cuda": "13.0", "commit": "abc1234"}
ROWS = [
    {"op": "attention", "dtype": "bfloat16", "grad": True, "head_dim": 128, "layout": "dense", "causal": True,
     "ranking": ["cuda", "triton", "native"], "ms": {"cuda": 1.0, "triton": 1.1, "native": 1.2}},
    {"op": "attention", "dtype": "bfloat16", "grad": True, "head_dim": 64, "layout": "dense", "causal": True,
     "ranking": ["native", "triton"], "ms": {"native": 1.0, "triton": 1.3},
     "excluded": {"cuda": "tests failed"}},
    {"op": "rms_norm", "dtype": "bfloat16", "grad": False, "ranking": ["triton", "native"],
     "ms": {"triton": 0.1, "native": 0.2}},
    {"op": "rms_norm", "dtype": "bfloat16", "grad": True, "ranking": ["native", "cuda"],
     "ms": {"native": 0.3, "cuda": 0.4}},
    {"op": "swiglu", "dtype": "bfloat16", "grad": True, "ranking": ["native", "triton"], "ms": {}},
]
ATTN_KIND = dict(dtype=torch.bfloat16, grad=True, head_dim=128, layout="dense", causal=True)


@pytest.fixture
def fake_table(tmp_path, monkeypatch):
    """Writes a table and points slmfast at it; the visible card is an sm_90 one."""
    def write(rows=ROWS, measured=MEASURED):
        path = tmp_path / "table.json"
        path.write_text(json.dumps({"measured": measured, "rows": rows}))
        monkeypatch.setenv(gpu_table.ENV_TABLE, str(path))
        gpu_table.reload()
        return path

    monkeypatch.setattr(gpu_table, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    write()
    yield write
    monkeypatch.delenv(gpu_table.ENV_TABLE)
    gpu_table.reload()


def test_head_dim_buckets():
    assert [gpu_table.head_dim_bucket(d) for d in (16, 64, 65, 80, 128, 129, 256, 512)] == \
        [64, 64, 128, 128, 128, 256, 256, 256]


def test_choice_is_the_rows_first_ranked_implementation(fake_table):
    assert gpu_table.choose("attention", **ATTN_KIND) == "cuda"
    assert gpu_table.choose("attention", **dict(ATTN_KIND, head_dim=64)) == "native"
    assert gpu_table.choose("rms_norm", dtype=torch.bfloat16, grad=False) == "triton"
    assert gpu_table.choose("rms_norm", dtype="bfloat16", grad=True) == "native"


def test_no_row_means_native(fake_table):
    assert gpu_table.choose("attention", **dict(ATTN_KIND, layout="packed")) == "native"
    assert gpu_table.choose("attention", **dict(ATTN_KIND, causal=False)) == "native"
    assert gpu_table.choose("rms_norm", dtype=torch.float16, grad=True) == "native"
    assert gpu_table.choose("rotary", dtype=torch.bfloat16, grad=True) == "native"
    # a call that leaves out a key the row has does not match it
    assert gpu_table.choose("attention", dtype=torch.bfloat16, grad=True, head_dim=128) == "native"


def test_no_measurement_or_no_file_means_native(fake_table, tmp_path, monkeypatch):
    fake_table(measured=None)
    assert gpu_table.choose("attention", **ATTN_KIND) == "native"
    monkeypatch.setenv(gpu_table.ENV_TABLE, str(tmp_path / "missing.json"))
    gpu_table.reload()
    assert gpu_table.choose("attention", **ATTN_KIND) == "native"
    assert gpu_table.load() == {"measured": None, "rows": []}


def test_another_card_generation_means_native(fake_table, monkeypatch):
    assert gpu_table.choose("attention", device=CUDA, **ATTN_KIND) == "cuda"
    monkeypatch.setattr(gpu_table, "_capability", lambda index: (8, 0))
    assert gpu_table.choose("attention", device=CUDA, **ATTN_KIND) == "native"


def test_the_repos_table_is_well_formed():
    gpu_table.reload()
    table = gpu_table.load()
    assert set(table) >= {"measured", "rows"}
    for row in table["rows"]:
        assert row["op"] and row["ranking"] and set(row["ranking"]) <= set(gpu_table.CHOICES)
        assert "native" in row["ranking"]


# ---- the automatic choice on CUDA calls (backends._automatic through gpu_table.select) -------

def _available(monkeypatch, *names):
    real = backends.status

    def status(name):
        if name in ("cuda", "triton"):
            return backends.BackendStatus(name, name in names, "faked by the test")
        return real(name)

    monkeypatch.setattr(backends, "status", status)


def test_select_follows_the_table_on_cuda_calls(fake_table, monkeypatch):
    _available(monkeypatch, "cuda", "triton")
    kind = tuple(ATTN_KIND.items())
    implemented = attention_op.IMPLEMENTED
    assert gpu_table.select("attention", implemented, CUDA, None, kind, True) == "cuda"
    slow_kind = tuple(dict(ATTN_KIND, head_dim=64).items())
    assert gpu_table.select("attention", implemented, CUDA, None, slow_kind, True) == "native"
    # an op without a native path of its own runs its plain-PyTorch reference instead
    glu_kind = (("dtype", torch.bfloat16), ("grad", True))
    glu_backends = ("cuda", "triton", "cpu", "torch")
    assert gpu_table.select("swiglu", glu_backends, CUDA, None, glu_kind, False) == "torch"
    # rows are read under table_op when given (glu_linear reads the swiglu rows)
    assert gpu_table.select("glu_linear", glu_backends, CUDA, None, glu_kind, False, "swiglu") == "torch"


def test_select_skips_ranked_backends_that_are_not_available(fake_table, monkeypatch):
    _available(monkeypatch, "triton")  # the table's winner, cuda, is not built here
    kind = tuple(ATTN_KIND.items())
    assert gpu_table.select("attention", attention_op.IMPLEMENTED, CUDA, None, kind, True) == "triton"
    _available(monkeypatch)
    assert gpu_table.select("attention", attention_op.IMPLEMENTED, CUDA, None, kind, True) == "native"


def test_forcing_a_backend_overrides_the_table(fake_table, monkeypatch):
    _available(monkeypatch, "cuda", "triton")
    kind = tuple(dict(ATTN_KIND, head_dim=64).items())  # the table says native here
    implemented = attention_op.IMPLEMENTED
    assert gpu_table.select("attention", implemented, CUDA, "triton", kind, True) == "triton"
    assert gpu_table.select("attention", implemented, CUDA, "torch", kind, True) == "torch"
    monkeypatch.setenv(backends.ENV_BACKEND, "triton")
    assert gpu_table.select("attention", implemented, CUDA, None, kind, True) == "triton"
    monkeypatch.setenv(backends.ENV_BACKEND, "auto")
    assert gpu_table.select("attention", implemented, CUDA, None, kind, True) == "native"


def test_cpu_calls_and_calls_without_a_kind_keep_the_fixed_order(fake_table, monkeypatch):
    _available(monkeypatch, "cuda", "triton")
    kind = tuple(dict(ATTN_KIND, head_dim=64).items())
    expected_cpu = backends.select("attention", attention_op.IMPLEMENTED, CPU)
    assert gpu_table.select("attention", attention_op.IMPLEMENTED, CPU, None, kind, True) == expected_cpu
    assert backends.select("attention", attention_op.IMPLEMENTED, CUDA) == "cuda"
    assert gpu_table.fixed_order("attention", attention_op.IMPLEMENTED, CUDA) == "cuda"


def test_info_prints_the_table(fake_table, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "measured 2026-12-04 on Fake H200 (sm_90)" in out
    assert "rms_norm" in out and "-> triton" in out
    assert "excluded cuda: tests failed" in out
    info = cli.info_dict()
    assert info["gpu_dispatch"]["rows"][0]["ranking"] == ["cuda", "triton", "native"]


def test_info_without_a_measurement(fake_table, capsys):
    fake_table(rows=[], measured=None)
    cli.main(["info"])
    assert "no GPU run recorded" in capsys.readouterr().out


# ---- the ops run their native path where the choice says so --------------------------------

def test_ops_run_their_native_path_when_chosen(monkeypatch):
    calls = []

    def native_everywhere(op, implemented, device, backend, kind, has_native, table_op=None):
        calls.append((op, dict(kind)))
        return "native" if has_native else "torch"

    monkeypatch.setattr(gpu_table, "select", native_everywhere)
    x, w, r = torch.randn(5, 48), torch.rand(48) + 0.5, torch.randn(5, 48)
    y, h = rms_norm(x, w, 1e-6, r)
    y_native, h_native = rms_norm_native(x, w, 1e-6, r)
    assert torch.equal(y, y_native) and torch.equal(h, h_native)
    assert calls[-1] == ("rms_norm", {"dtype": torch.float32, "grad": False})
    q, k, v = (torch.randn(2, 4, 9, 32) for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert torch.equal(out, attention_native(q, k, v, True, 32 ** -0.5))
    assert calls[-1] == ("attention", {"dtype": torch.float32, "grad": False, "head_dim": 64,
                                       "layout": "dense", "causal": True})
    # torch's own cannot return this op's lse: such a call takes the fixed order instead
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    assert torch.allclose(out.double(), ref, atol=1e-5) and torch.allclose(lse.double(), ref_lse, atol=1e-5)


# ---- the native paths against the fp64 references -------------------------------------------

@pytest.mark.parametrize("case", [
    # (B, Hq, Hkv, T, S, D, causal)
    (2, 4, 4, 33, 33, 64, True),
    (1, 8, 2, 17, 17, 40, True),    # GQA, odd head dim
    (3, 2, 1, 5, 29, 80, False),    # T != S without a causal mask
    (1, 2, 2, 1, 7, 16, False),     # one query (decoding)
], ids=str)
def test_native_attention_matches_the_reference(case):
    b, hq, hkv, t, s, d, causal = case
    q = torch.randn(b, hq, t, d)
    k, v = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    grad_out = torch.randn(b, hq, t, d, dtype=torch.float64)
    scale = 0.7 / d ** 0.5

    def native(q_, k_, v_):
        return attention_native(q_, k_, v_, causal, scale)

    def same_dtype(q_, k_, v_):
        return attention_reference(q_, k_, v_, causal=causal, scale=scale)

    def fp64(q_, k_, v_):
        return attention_reference(q_.double(), k_.double(), v_.double(), causal=causal, scale=scale)

    out, grads = value_and_grads(native, q, k, v, grad_output=grad_out)
    base, base_grads = value_and_grads(same_dtype, q, k, v, grad_output=grad_out)
    ref, ref_grads = value_and_grads(fp64, q, k, v, grad_output=grad_out)
    assert_close("out", out, base, ref, floor_ulps=8)
    for name, g, gb, gr in zip(("dq", "dk", "dv"), grads, base_grads, ref_grads):
        assert_close(name, g, gb, gr, floor_ulps=8)


def test_native_attention_declines_what_torch_computes_differently():
    q = torch.randn(1, 2, 6, 32)
    kv = torch.randn(1, 2, 9, 32)
    assert attention_native(q, kv, kv, True, 0.1) is None          # causal T != S: SDPA aligns top-left
    square = torch.randn(1, 2, 9, 32)
    assert attention_native(square, square, square, True, 0.1, 4, -1) is None  # window: varlen, CUDA only
    packed = torch.randn(12, 2, 32)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    assert attention_native(packed, packed, packed, True, 0.1, -1, -1, cu, None, 7, 7) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["plain", "residual-offset", "fp32-weight"])
def test_native_rms_norm_matches_the_reference(dtype, variant):
    x = torch.randn(6, 3, 96, dtype=dtype) * 2 + 0.5
    weight_dtype = torch.float32 if variant == "fp32-weight" else dtype
    w = (torch.rand(96) + 0.5).to(weight_dtype)
    r = torch.randn(6, 3, 96, dtype=dtype) if variant == "residual-offset" else None
    offset = 1.0 if variant == "residual-offset" else 0.0
    grad_y = torch.randn(6, 3, 96, dtype=torch.float64)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def native(x_, w_):
        return first(rms_norm_native(x_, w_, 1e-5, r, offset))

    def same_dtype(x_, w_):
        return first(rms_norm_reference(x_, w_, 1e-5, r, offset))

    def fp64(x_, w_):
        return first(rms_norm_reference(x_.double(), w_.double(), 1e-5, r.double() if r is not None else None,
                                        offset))

    out, grads = value_and_grads(native, x, w, grad_output=grad_y)
    base, base_grads = value_and_grads(same_dtype, x, w, grad_output=grad_y)
    ref, ref_grads = value_and_grads(fp64, x, w, grad_output=grad_y)
    assert out.dtype == dtype
    assert_close("y", out, base, ref)
    for name, g, gb, gr in zip(("dx", "dw"), grads, base_grads, ref_grads):
        assert_close(name, g, gb, gr, floor_ulps=8)
    if r is not None:
        assert torch.equal(rms_norm_native(x, w, 1e-5, r, offset)[1], x + r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["affine", "residual", "fp32-params", "no-weight"])
def test_native_layer_norm_matches_the_reference(dtype, variant):
    x = torch.randn(4, 5, 80, dtype=dtype) * 3 + 1
    param_dtype = torch.float32 if variant == "fp32-params" else dtype
    w = None if variant == "no-weight" else (torch.rand(80) + 0.5).to(param_dtype)
    b = torch.randn(80).to(param_dtype)
    r = torch.randn(4, 5, 80, dtype=dtype) if variant == "residual" else None

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    out = first(layer_norm_native(x, w, b, 1e-5, r))
    base = first(layer_norm_reference(x, w, b, 1e-5, r))
    ref = first(layer_norm_reference(x.double(), w.double() if w is not None else None, b.double(), 1e-5,
                                     r.double() if r is not None else None))
    assert out.dtype == dtype
    assert_close("y", out, base, ref)


# ---- the table writer (benchmarks/gpu_dispatch.py) -------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.ops.test_rms_norm" name="test_matches_fp64_reference[cuda-residual]"/>
<testcase classname="tests.ops.test_rms_norm" name="test_matches_fp64_reference[triton-residual]">
  <failure message="AssertionError">error exceeds</failure></testcase>
<testcase classname="tests.ops.test_gpu_realistic" name="test_rms_norm[native-llama]"/>
<testcase classname="tests.ops.test_attention_cuda" name="test_dense[bf16-128]"/>
<testcase classname="tests.ops.test_gpu_realistic" name="test_attention[triton-1x16x4096xD128-causal-bf16]"/>
<testcase classname="tests.ops.test_nonfinite"
  name="test_nonfinite_input[linear_cross_entropy-triton-float32-x]"/>
<testcase classname="tests.ops.test_glu" name="test_matches_fp64_reference[cuda-x]">
  <skipped message="no cuda"/></testcase>
</testsuite></testsuites>"""


def _figures():
    def rec(op, impl, pass_, ms, **kind):
        return dict(op=op, impl=impl, ms=ms, shape="s", **{"pass": pass_}, **kind)

    attn = dict(dtype="bfloat16", head_dim=128, layout="dense", causal=True)
    return {
        "env": {"date": "2026-12-04", "card": "NVIDIA H200", "capability": [9, 0], "torch": "2.11.0"},
        "attention": [rec("attention", "cuda", "fwd+bwd", 5.0, **attn),
                      rec("attention", "triton", "fwd+bwd", 3.0, **attn),
                      rec("attention", "native", "fwd+bwd", 4.0, **attn),
                      rec("attention", "sdpa-flash", "fwd+bwd", 3.9, **attn)],
        "layers": [rec("rms_norm", "cuda", "fwd+bwd", 1.0, dtype="bfloat16"),
                   rec("rms_norm", "triton", "fwd+bwd", 0.5, dtype="bfloat16"),
                   rec("rms_norm", "native", "fwd+bwd", 2.0, dtype="bfloat16"),
                   rec("rms_norm", "cuda", "fwd", 0.6, dtype="bfloat16"),
                   rec("rms_norm", "native", "fwd", 0.4, dtype="bfloat16")],
        "losses": [rec("linear_cross_entropy", "triton", "fwd+bwd", 10.0, dtype="bfloat16"),
                   rec("linear_cross_entropy", "native", "fwd+bwd", 30.0, dtype="bfloat16"),
                   {"op": "linear_cross_entropy", "impl": "cuda", "pass": "fwd+bwd", "dtype": "bfloat16",
                    "error": "RuntimeError: boom"}],
    }


def _table(tmp_path):
    from benchmarks import gpu_dispatch
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    table = gpu_dispatch.build_table(_figures(), gpu_dispatch.read_junit([junit]))
    return {(r["op"], r.get("head_dim"), r["grad"]): r for r in table["rows"]}, table


def test_writer_ranks_only_kernels_whose_tests_passed(tmp_path):
    rows, table = _table(tmp_path)
    assert table["measured"]["card"] == "NVIDIA H200" and table["measured"]["capability"] == [9, 0]
    norm = rows[("rms_norm", None, True)]
    assert norm["ranking"] == ["cuda", "native"]  # triton was fastest but one of its tests failed
    assert "1 failed test(s)" in norm["excluded"]["triton"]
    assert norm["ms"] == {"cuda": 1.0, "triton": 0.5, "native": 2.0}
    # slower than torch's own: native first
    assert rows[("rms_norm", None, False)]["ranking"] == ["native", "cuda"]
    # attention: the triton GPU-size test passed, cuda's own test file too; sdpa-flash is a baseline
    assert rows[("attention", 128, True)]["ranking"] == ["triton", "native", "cuda"]


def test_writer_excludes_untested_and_failed_figures(tmp_path):
    rows, _ = _table(tmp_path)
    lce = rows[("linear_cross_entropy", None, True)]
    assert lce["ranking"] == ["triton", "native"]
    assert lce["excluded"]["cuda"] in ("no passing test on this run", "RuntimeError: boom")
    # losses are measured with gradients; the rows without repeat that ranking
    assert rows[("linear_cross_entropy", None, False)]["ranking"] == ["triton", "native"]


def test_written_table_drives_the_choice(tmp_path, fake_table, monkeypatch):
    _, table = _table(tmp_path)
    fake_table(rows=table["rows"], measured=table["measured"])
    assert gpu_table.choose("rms_norm", dtype=torch.bfloat16, grad=True) == "cuda"
    assert gpu_table.choose("rms_norm", dtype=torch.bfloat16, grad=False) == "native"
    assert gpu_table.choose("attention", **ATTN_KIND) == "triton"
    assert gpu_table.choose("attention", **dict(ATTN_KIND, dtype=torch.float16)) == "native"


def test_writer_takes_a_tests_last_outcome(tmp_path):
    from benchmarks import gpu_dispatch
    case = ('<testcase classname="tests.ops.test_rotary" name="test_dense_matches_fp64_reference[cuda-x]">'
            '{}</testcase>')
    runs = [case.format('<failure message="x"/>'), case.format(""), case.format('<skipped message="y"/>')]
    paths = []
    for i, body in enumerate(runs):
        paths.append(tmp_path / f"run{i}.xml")
        paths[-1].write_text(f"<testsuites><testsuite>{body}</testsuite></testsuites>")
    assert gpu_dispatch.read_junit(paths[:1])[("rotary", "cuda")]["failed"]
    fixed = gpu_dispatch.read_junit(paths)[("rotary", "cuda")]  # failed, then passed, then skipped
    assert fixed["passed"] == 1 and fixed["failed"] == []
