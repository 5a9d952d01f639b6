"""The Triton attention launchers (slmfast/triton/attention.py) against a float64 oracle.

The oracle is tests.helpers.attention_oracle, the contract of slmfast/ops/attention.py in plain
PyTorch (rows that see no key give 0 and lse -inf). Run in float64 it is the oracle; run in the
input dtype it is the "torch in the same dtype" baseline of the tolerance rule
(tests.helpers.assert_close, docs/architecture.md §5). Forward out and lse and all three input
gradients are compared.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors: float32 and float16 only
(bf16 tl.dot is wrong in the interpreter, docs/architecture.md §5) and small shapes. Tests marked
`gpu` (run by benchmarks/gpu_check.sh through `pytest -m gpu`) take realistic shapes in
bf16/fp16/fp32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from slmfast.triton import attention as tattn  # noqa: E402
from tests.helpers import assert_close, attention_oracle, flash_attention_grads, lse_floor_ulps  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
NO_WINDOW = (-1, -1)


# ------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------

def _check_lse(ours, base, ref):
    """lse: -inf exactly on the rows that see no key, the tolerance rule elsewhere."""
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), empty), "lse: -inf rows differ from the reference"
    assert not torch.isnan(ours).any(), "lse: NaN"
    keep = ~empty
    assert_close("lse", ours[keep], base.float()[keep], ref[keep])


def _compare(q, k, v, *, scale, causal, window, cu_q=None, cu_k=None):
    """Run the launchers and both references; compare out, lse, dq, dk, dv. Returns ours."""
    kw = dict(scale=scale, causal=causal, window_left=window[0], window_right=window[1])
    if cu_q is not None:
        kw.update(cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=q.device),
                  cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=q.device),
                  max_seqlen_q=max(b - a for a, b in zip(cu_q, cu_q[1:])),
                  max_seqlen_k=max(b - a for a, b in zip(cu_k, cu_k[1:])))

    documents = {} if cu_q is None else dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k)

    def ref_fn(q_, k_, v_):
        return attention_oracle(q_, k_, v_, scale=scale, causal=causal, window=window, **documents)

    grad_out = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    out, lse = tattn.attention_fwd(q, k, v, **kw)
    dq, dk, dv = tattn.attention_bwd(grad_out.to(q.dtype), q, k, v, out, lse, **kw)

    runs = {}
    for name, cast in (("base", lambda t: t), ("ref", lambda t: t.double())):
        leaves = [cast(t).detach().requires_grad_(True) for t in (q, k, v)]
        o, lse_r = ref_fn(*leaves)
        o.backward(grad_out.to(o.dtype))
        runs[name] = (o.detach(), lse_r.detach(), *(t.grad for t in leaves))
    base, ref = runs["base"], runs["ref"]

    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert_close("out", out, base[0], ref[0])
    _check_lse(lse, base[1], ref[1])
    # The gradients' baseline: also the flash backward's own formulas in torch, and the floor of
    # its recomputation from the float32 lse (tests/helpers.py: flash_attention_grads,
    # lse_floor_ulps): with autograd through softmax alone, dq/dk of window-masked-rows failed on
    # 2 of 6 draws in float32 (dq 6.6e-7 > 2 x 1.3e-7 + 2.7e-7).
    layout = {}
    if cu_q is not None:
        layout = dict(cu_seqlens=torch.tensor(cu_q, dtype=torch.int32, device=q.device),
                      cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=q.device))
    flash = flash_attention_grads(q, k, v, grad_out, causal=causal, window=window, scale=scale, **layout)
    ulps = lse_floor_ulps(ref[1])
    for name, ours, b, f, r in zip(("dq", "dk", "dv"), (dq, dk, dv), base[2:], flash, ref[2:]):
        # the second baseline is torch's rounding too, not a loose one: within 4x the first
        floor = 4 * torch.finfo(f.dtype).eps * r.abs().max().item()
        assert (f.double() - r).abs().max().item() <= 4 * (b.double() - r).abs().max().item() + floor
        assert_close(name, ours, [b, f], r, floor_ulps=ulps)
    return out, lse, dq, dk, dv


def _dense_inputs(b, hq, hkv, t, s, d, dtype, noncontiguous=False):
    if noncontiguous:  # (B, T, H, D) storage seen as (B, H, T, D), as after a projection
        q = torch.randn(b, t, hq, d, device=DEVICE).to(dtype).transpose(1, 2)
        k = torch.randn(b, s, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
        v = torch.randn(b, s, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
        return q, k, v
    return tuple(torch.randn(b, h, n, d, device=DEVICE).to(dtype)
                 for h, n in ((hq, t), (hkv, s), (hkv, s)))


# ------------------------------------------------------------------------------------------
# Interpreter-sized tests (fp32, fp16)
# ------------------------------------------------------------------------------------------

SMALL_DTYPES = [torch.float32, torch.float16]

# (B, Hq, Hkv, T, S, D, causal, window)
DENSE_CASES = {
    "causal-T17-D40": (2, 2, 2, 17, 17, 40, True, NO_WINDOW),
    "noncausal-T<S-D64": (1, 2, 2, 20, 45, 64, False, NO_WINDOW),
    "causal-T<S-mqa": (1, 4, 1, 13, 40, 16, True, NO_WINDOW),
    "causal-T>S-masked-rows": (1, 2, 1, 40, 17, 16, True, NO_WINDOW),
    "noncausal-T>S-D40": (1, 2, 2, 33, 9, 40, False, NO_WINDOW),
    "decode-T1": (2, 4, 2, 1, 37, 64, True, NO_WINDOW),
    "gqa4-T1-noncausal": (1, 8, 2, 1, 20, 16, False, NO_WINDOW),
    "gqa4-causal-D64": (1, 8, 2, 24, 24, 64, True, NO_WINDOW),
    "causal-multiblock": (1, 1, 1, 80, 80, 16, True, NO_WINDOW),
    "window-left": (1, 2, 1, 50, 50, 16, False, (7, -1)),
    "window-right": (1, 2, 2, 30, 41, 40, False, (-1, 5)),
    "window-both": (1, 2, 1, 45, 38, 16, False, (6, 3)),
    "causal-window-left": (1, 4, 2, 70, 70, 16, True, (9, -1)),
    "window-masked-rows": (1, 2, 1, 20, 5, 16, False, (-1, 2)),  # rows i < 13 see nothing
}


@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DENSE_CASES), ids=str)
def test_dense_matches_reference(case, dtype):
    b, hq, hkv, t, s, d, causal, window = DENSE_CASES[case]
    q, k, v = _dense_inputs(b, hq, hkv, t, s, d, dtype)
    _compare(q, k, v, scale=d ** -0.5, causal=causal, window=window)


def test_fully_masked_rows_are_exact_zeros():
    # T > S causal: queries i < T - S see no key; out 0, lse -inf, dq 0, and no NaN anywhere.
    q, k, v = _dense_inputs(1, 2, 1, 40, 17, 16, torch.float32)
    out, lse, dq, dk, dv = _compare(q, k, v, scale=0.25, causal=True, window=NO_WINDOW)
    masked = slice(0, 40 - 17)
    assert torch.equal(out[:, :, masked], torch.zeros_like(out[:, :, masked]))
    assert torch.isneginf(lse[:, :, masked]).all() and torch.isfinite(lse[:, :, 40 - 17:]).all()
    assert torch.equal(dq[:, :, masked], torch.zeros_like(dq[:, :, masked]))
    assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))


def test_empty_keys_dense():
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    k = torch.randn(1, 2, 0, 16, device=DEVICE)
    out, lse = tattn.attention_fwd(q, k, k, scale=0.25, causal=False, window_left=-1, window_right=-1)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = tattn.attention_bwd(torch.randn_like(q), q, k, k, out, lse, scale=0.25, causal=False,
                                     window_left=-1, window_right=-1)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == k.shape


@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
def test_noncontiguous_inputs(dtype):
    q, k, v = _dense_inputs(2, 4, 2, 19, 23, 40, dtype, noncontiguous=True)
    assert not q.is_contiguous()
    _compare(q, k, v, scale=0.3, causal=True, window=NO_WINDOW)


PACKED_CASES = {
    # name: (docs as (T_b, S_b), Hq, Hkv, D, causal, window)
    "self-causal": ([(1, 1), (17, 17), (5, 5), (30, 30), (1, 1)], 2, 1, 16, True, NO_WINDOW),
    "self-noncausal-D40": ([(9, 9), (1, 1), (26, 26)], 2, 2, 40, False, NO_WINDOW),
    "self-gqa4-window": ([(33, 33), (12, 12), (1, 1)], 4, 1, 16, True, (5, -1)),
    "cross-lengths": ([(3, 10), (12, 4), (1, 1), (0, 6), (4, 0), (20, 20)], 2, 1, 16, True, NO_WINDOW),
    "cross-window-both": ([(15, 25), (18, 9)], 2, 2, 64, False, (4, 6)),
}


@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PACKED_CASES), ids=str)
def test_packed_matches_reference(case, dtype):
    docs, hq, hkv, d, causal, window = PACKED_CASES[case]
    cu_q, cu_k = [0], [0]
    for t, s in docs:
        cu_q.append(cu_q[-1] + t)
        cu_k.append(cu_k[-1] + s)
    q = torch.randn(cu_q[-1], hq, d, device=DEVICE).to(dtype)
    k = torch.randn(cu_k[-1], hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(cu_k[-1], hkv, d, device=DEVICE).to(dtype)
    _compare(q, k, v, scale=d ** -0.5, causal=causal, window=window, cu_q=cu_q, cu_k=cu_k)


def test_packed_noncontiguous_slices_of_fused_qkv():
    # q, k, v as views into one (N, 3, H, D) projection output: row stride 3*H*D.
    n, h, d = 40, 2, 16
    qkv = torch.randn(n, 3, h, d, device=DEVICE)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = [0, 11, 12, 40]
    _compare(q, k, v, scale=0.25, causal=True, window=NO_WINDOW, cu_q=cu, cu_k=cu)


@pytest.mark.parametrize("tiles", [{"fwd": (32, 16), "dkdv": (32, 16), "dq": (16, 32)},
                                   {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}],
                         ids=["tall", "square"])
def test_other_tilings(tiles, monkeypatch):
    # The block-range arithmetic must hold for any BLOCK_M / BLOCK_N pair, not just the default.
    monkeypatch.setattr(tattn, "INTERPRET_BLOCKS", tiles)
    if ON_GPU:
        pytest.skip("tilings are chosen by the autotuner on a GPU")
    q, k, v = _dense_inputs(1, 4, 2, 45, 61, 16, torch.float32)
    _compare(q, k, v, scale=0.25, causal=True, window=(20, -1))
    q, k, v = _dense_inputs(1, 2, 1, 50, 29, 16, torch.float32)
    _compare(q, k, v, scale=0.25, causal=False, window=(3, 8))


def test_backward_is_deterministic():
    q, k, v = _dense_inputs(1, 4, 1, 37, 37, 16, torch.float16)
    kw = dict(scale=0.25, causal=True, window_left=-1, window_right=-1)
    out, lse = tattn.attention_fwd(q, k, v, **kw)
    dout = torch.randn_like(out)
    first = tattn.attention_bwd(dout, q, k, v, out, lse, **kw, deterministic=True)
    second = tattn.attention_bwd(dout, q, k, v, out, lse, **kw, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launchers_do_not_modify_inputs():
    q, k, v = _dense_inputs(1, 2, 1, 17, 17, 16, torch.float32)
    saved = [t.clone() for t in (q, k, v)]
    kw = dict(scale=0.25, causal=True, window_left=-1, window_right=-1)
    out, lse = tattn.attention_fwd(q, k, v, **kw)
    dout = torch.randn_like(out)
    out_saved, lse_saved, dout_saved = out.clone(), lse.clone(), dout.clone()
    tattn.attention_bwd(dout, q, k, v, out, lse, **kw)
    for a, b in zip((q, k, v, out, lse, dout), (*saved, out_saved, lse_saved, dout_saved)):
        assert torch.equal(a, b)


def test_bad_arguments_raise():
    q = torch.randn(1, 3, 4, 16, device=DEVICE)
    k = torch.randn(1, 2, 4, 16, device=DEVICE)
    kw = dict(scale=0.25, causal=False, window_left=-1, window_right=-1)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        tattn.attention_fwd(q, k, k, **kw)
    with pytest.raises(ValueError, match="head dim"):
        tattn.attention_fwd(q, q[..., :8], q, **kw)
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        tattn.attention_fwd(q, q.half(), q, **kw)
    big = torch.randn(1, 1, 2, 320, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        tattn.attention_fwd(big, big, big, **kw)


# ------------------------------------------------------------------------------------------
# GPU tests (pytest -m gpu): realistic shapes, bf16
# ------------------------------------------------------------------------------------------

@pytest.fixture
def fixed_configs(monkeypatch):
    """Default configs without timing runs: keeps the GPU test run short (tuning compiles every
    config). test_gpu_autotuned covers the tuned path."""
    monkeypatch.setenv(tattn.ENV_AUTOTUNE, "0")


GPU_DENSE_CASES = {
    # name: (B, Hq, Hkv, T, S, D, causal, window, dtype)
    "bf16-D128-T4096-causal-gqa4": (1, 8, 2, 4096, 4096, 128, True, NO_WINDOW, torch.bfloat16),
    "bf16-D128-T4096-noncausal": (2, 4, 4, 4096, 4096, 128, False, NO_WINDOW, torch.bfloat16),
    "bf16-D64-T2048-window": (2, 4, 1, 2048, 2048, 64, True, (256, -1), torch.bfloat16),
    "fp16-D80-T>S-causal-masked-rows": (2, 4, 2, 1100, 700, 80, True, NO_WINDOW, torch.float16),
    "bf16-D256-T1024": (1, 4, 2, 1024, 1024, 256, True, NO_WINDOW, torch.bfloat16),
    "fp32-D64-T513": (1, 4, 2, 513, 513, 64, False, (-1, 40), torch.float32),
    "bf16-D128-decode": (4, 8, 2, 1, 3000, 128, True, NO_WINDOW, torch.bfloat16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_DENSE_CASES), ids=str)
def test_gpu_dense(case, fixed_configs):
    b, hq, hkv, t, s, d, causal, window, dtype = GPU_DENSE_CASES[case]
    q, k, v = _dense_inputs(b, hq, hkv, t, s, d, dtype, noncontiguous=(d == 128 and t > 1))
    _compare(q, k, v, scale=d ** -0.5, causal=causal, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [NO_WINDOW, (300, -1)], ids=["causal", "causal-window"])
def test_gpu_packed(window, fixed_configs):
    lengths = [1, 700, 1, 1500, 333, 1029, 512, 20]  # 4096 tokens, documents of unequal lengths
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    hq, hkv, d = 8, 2, 128
    qkv = torch.randn(cu[-1], hq + 2 * hkv, d, device=DEVICE).to(torch.bfloat16)  # fused projection
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    _compare(q, k, v, scale=d ** -0.5, causal=True, window=window, cu_q=cu, cu_k=cu)


@pytest.mark.gpu
def test_gpu_autotuned():
    # The tuned path (every config of the sm_90 / sm_80 list compiles and the chosen one is right).
    q, k, v = _dense_inputs(2, 8, 8, 2048, 2048, 128, torch.bfloat16)
    _compare(q, k, v, scale=128 ** -0.5, causal=False, window=NO_WINDOW)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(fixed_configs):
    q, k, v = _dense_inputs(2, 8, 2, 4096, 4096, 128, torch.bfloat16)
    kw = dict(scale=128 ** -0.5, causal=True, window_left=-1, window_right=-1)
    out, lse = tattn.attention_fwd(q, k, v, **kw)
    dout = torch.randn_like(out)
    first = tattn.attention_bwd(dout, q, k, v, out, lse, **kw, deterministic=True)
    for _ in range(2):
        again = tattn.attention_bwd(dout, q, k, v, out, lse, **kw, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
