"""attention on every available backend against the float64 reference (docs/architecture.md §5).

Dense and packed layouts, causal (bottom-right) and sliding-window masks, GQA/MQA, T != S, T = 1,
odd lengths, fully masked rows, all input gradients; gradcheck (fp64, cpu), determinism, opcheck,
torch.compile, bad input, and slmfast's scaled_dot_product_attention against torch's. The Triton
backend runs under the interpreter here (slow, and bf16 tl.dot is wrong there, docs/architecture.md
§5), so it gets a smaller parametrization in fp32 and fp16.
"""

import math
import warnings

import pytest
import torch

from slmfast import backends
from slmfast.functional import attention, scaled_dot_product_attention
from slmfast.ops import attention as attention_op
from slmfast.ops.attention import attention_reference
from tests.helpers import (
    assert_close,
    attention_oracle,
    backend_params,
    cpu_capability_params,
    device_for,
    flash_attention_grads,
    lse_floor_ulps,
    max_abs_err,
    saved_tensor_bytes,
)

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params(attention_op.IMPLEMENTED)
FAST = [b for b in BACKENDS if b.values[0] in ("torch", "cpu", "cuda")]
TRITON = [b for b in BACKENDS if b.values[0] == "triton"]
COMPILED = [b for b in BACKENDS if b.values[0] != "torch"]
INTERPRETED = backends.triton_interpreting() and not torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TRITON_DTYPES = [torch.float32, torch.float16] if INTERPRETED else DTYPES
CPU = pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")

# (B, Hq, Hkv, T, S, D, causal, window)
DENSE_CASES = [
    (2, 4, 4, 64, 64, 64, True, None),
    (2, 4, 4, 64, 64, 64, False, None),
    (1, 4, 1, 17, 17, 16, True, None),          # MQA, odd T
    (3, 8, 2, 129, 129, 40, True, None),        # GQA 4:1, T = 129, batch 3
    (1, 2, 2, 1, 33, 80, True, None),           # one query (decoding) against 33 keys
    (2, 4, 2, 33, 70, 128, False, None),        # T != S
    (1, 4, 2, 70, 33, 64, True, None),          # causal with T > S: the first 37 rows see nothing
    (2, 2, 2, 100, 100, 64, True, (16, -1)),    # causal sliding window
    (1, 2, 1, 77, 77, 64, False, (8, 8)),       # two-sided window
    (1, 2, 2, 20, 40, 16, False, (-1, 0)),      # right edge only
]
TRITON_CASES = [
    (1, 2, 1, 17, 17, 16, True, None),
    (1, 2, 2, 1, 20, 32, True, None),
    (1, 4, 2, 24, 40, 40, False, (6, 3)),
]
# Documents of a packed batch (lengths), including length-1 and empty ones.
PACKED_DOCS = [[1, 17, 64, 5, 33], [40, 0, 1, 24]]


def _case_id(case):
    B, Hq, Hkv, T, S, D, causal, window = case
    name = f"B{B}-H{Hq}/{Hkv}-T{T}-S{S}-D{D}-{'causal' if causal else 'full'}"
    return name + (f"-w{window}" if window else "")


def _dense_inputs(case, dtype, device):
    B, Hq, Hkv, T, S, D, _, _ = case
    q = torch.randn(B, Hq, T, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
    return q, k, v


def _packed_inputs(lengths, Hq, Hkv, D, dtype, device):
    N = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(N, Hq, D, dtype=dtype, device=device)
    k = torch.randn(N, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(N, Hkv, D, dtype=dtype, device=device)
    return q, k, v, cu, max(lengths)


def _grads(fn, q, k, v, grad_out):
    """out, lse and the gradients of (out . grad_out) w.r.t. q, k, v."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    (dq, dk, dv) = torch.autograd.grad((out.double() * grad_out).sum(), leaves)
    return out, lse, dq, dk, dv


def _assert_lse_close(ours, baseline, reference):
    """lse: -inf exactly where the reference has it (rows that see nothing), close elsewhere."""
    empty = reference == float("-inf")
    assert torch.equal(ours == float("-inf"), empty), "lse: -inf rows differ from the reference"
    assert_close("lse", ours[~empty], baseline.float()[~empty], reference[~empty])


def _check_against_reference(backend, q, k, v, **kwargs):
    """Output, lse and every input gradient of `backend` against the fp64 oracle
    (tests.helpers.attention_oracle, written apart from the op's reference, so that the torch
    backend is checked too), with the oracle in the same dtype as the baseline of the tolerance
    rule (for the gradients, the larger error of autograd through softmax and of the flash
    backward's formulas: flash_attention_grads)."""
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    ours = _grads(lambda *t: attention(*t, return_lse=True, backend=backend, **kwargs), q, k, v, grad_out)
    same = _grads(lambda *t: attention_oracle(*t, **kwargs), q, k, v, grad_out)
    fp64 = _grads(lambda *t: attention_oracle(*(x.double() for x in t), **kwargs), q, k, v, grad_out)
    flash = flash_attention_grads(q, k, v, grad_out, **kwargs)
    assert ours[0].dtype == q.dtype and ours[1].dtype == torch.float32
    ulps = lse_floor_ulps(fp64[1])
    assert_close("out", ours[0], same[0], fp64[0], floor_ulps=ulps)  # P = exp2((s - m) log2 e) too
    _assert_lse_close(ours[1], same[1], fp64[1])
    for name, a, b, f, r in zip(("dq", "dk", "dv"), ours[2:], same[2:], flash, fp64[2:]):
        # the second baseline is torch's rounding too, not a loose one: within 4x the first
        floor = 4 * torch.finfo(f.dtype).eps * r.abs().max().item()
        assert max_abs_err(f, r) <= 4 * max_abs_err(b, r) + floor
        assert_close(name, a, [b, f], r, floor_ulps=ulps)
    return ours



@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_matches_fp64_reference(backend, case, dtype):
    q, k, v = _dense_inputs(case, dtype, device_for(backend))
    _check_against_reference(backend, q, k, v, causal=case[6], window=case[7])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("lengths", PACKED_DOCS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (7, -1))],
                         ids=["causal", "full", "window"])
def test_packed_matches_fp64_reference(backend, lengths, dtype, causal, window):
    q, k, v, cu, max_len = _packed_inputs(lengths, 4, 2, 64, dtype, device_for(backend))
    _check_against_reference(backend, q, k, v, causal=causal, window=window, cu_seqlens=cu,
                             max_seqlen=max_len)


@pytest.mark.parametrize("backend", [b for b in FAST if b.values[0] != "cuda"] + TRITON)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_with_own_key_offsets(backend, causal):
    """cu_seqlens_k: each document has its own number of keys (a padded batch with a KV cache,
    the way transformers hands it over). Oracle: tests.helpers.attention_oracle, which runs each
    document alone (causal is bottom-right aligned within the document)."""
    device = device_for(backend)
    q_lengths, k_lengths = [3, 1, 9, 0], [7, 12, 9, 4]
    cu_q = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lengths), 4, 32, device=device)                  # (Nq, Hq, D)
    k = torch.randn(sum(k_lengths), 2, 32, device=device)                  # (Nk, Hkv, D)
    v = torch.randn(sum(k_lengths), 2, 32, device=device)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    out, lse, dq, dk, dv = _grads(
        lambda *t: attention(*t, causal=causal, cu_seqlens=cu_q, max_seqlen=max(q_lengths),
                             cu_seqlens_k=cu_k, max_seqlen_k=max(k_lengths), return_lse=True,
                             backend=backend), q, k, v, grad_out)

    def per_document(q, k, v):
        return attention_oracle(q, k, v, causal=causal, cu_seqlens=cu_q, cu_seqlens_k=cu_k)

    same = _grads(per_document, q, k, v, grad_out)
    fp64 = _grads(lambda *t: per_document(*(x.double() for x in t)), q, k, v, grad_out)
    assert_close("out", out, same[0], fp64[0])
    _assert_lse_close(lse, same[1], fp64[1])
    for name, a, b, r in zip(("dq", "dk", "dv"), (dq, dk, dv), same[2:], fp64[2:]):
        assert_close(name, a, b, r, floor_ulps=lse_floor_ulps(fp64[1]))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        attention(q, k, v, cu_seqlens=cu_q, max_seqlen=9, cu_seqlens_k=cu_k[:-1], backend=backend)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_dense_matches_fp64_reference(backend, case, dtype):
    q, k, v = _dense_inputs(case, dtype, device_for(backend))
    _check_against_reference(backend, q, k, v, causal=case[6], window=case[7])


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_packed_matches_fp64_reference(backend, dtype):
    q, k, v, cu, max_len = _packed_inputs([1, 19, 0, 12], 2, 1, 32, dtype, device_for(backend))
    _check_against_reference(backend, q, k, v, causal=True, cu_seqlens=cu, max_seqlen=max_len)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros(backend):
    """Rows that see no key: causal with T > S, and a window that ends before the keys start."""
    device = device_for(backend)
    q, k, v = _dense_inputs((1, 2, 1, 12, 5, 16, True, None), torch.float32, device)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, causal=True, return_lse=True, backend=backend)
    out.sum().backward()
    empty = 12 - 5  # rows 0..6 have i + (S - T) < 0
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.isinf(lse[:, :, :empty]).all() and (lse[:, :, :empty] < 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, empty:]).all()
    assert torch.equal(leaves[0].grad[:, :, :empty], torch.zeros_like(leaves[0].grad[:, :, :empty]))
    for t in leaves:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_input_is_not_hidden(backend, dtype):
    """A NaN in a key reaches the output rows that see it (no masking of bad input)."""
    q, k, v = _dense_inputs((1, 2, 2, 40, 40, 32, True, None), dtype, device_for(backend))
    k[0, 0, 10, 3] = float("nan")
    out = attention(q, k, v, causal=True, backend=backend)
    assert torch.isnan(out[0, 0, 10:]).all(dim=-1).all()  # rows 10.. see key 10
    assert torch.isfinite(out[0, 0, :10]).all() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """(B, T, H, D) projections viewed as (B, H, T, D), as attention modules produce them."""
    device = device_for(backend)
    q = torch.randn(2, 24, 4, 32, device=device).transpose(1, 2)  # (B, H, T, D), strided
    k = torch.randn(2, 24, 2, 32, device=device).transpose(1, 2)
    v = torch.randn(2, 24, 2, 32, device=device).transpose(1, 2)
    _check_against_reference(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_argument(backend):
    q, k, v = _dense_inputs((1, 2, 2, 16, 16, 32, False, None), torch.float32, device_for(backend))
    _check_against_reference(backend, q, k, v, scale=0.3)


@pytest.mark.parametrize("backend", FAST)
def test_odd_head_dim_bf16(backend):
    """bf16 on the cpu pairs head-dim values (VNNI): an odd D is padded inside the op."""
    q, k, v = _dense_inputs((1, 2, 1, 20, 20, 33, True, None), torch.bfloat16, device_for(backend))
    _check_against_reference(backend, q, k, v, causal=True)


@CPU
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(packed, capability):
    kwargs = {"causal": True, "window": (3, -1)}
    if packed:
        q, k, v, cu, max_len = _packed_inputs([3, 1, 5], 2, 1, 8, torch.float64, "cpu")
        kwargs.update(cu_seqlens=cu, max_seqlen=max_len)
    else:
        q, k, v = _dense_inputs((1, 2, 1, 5, 7, 8, True, None), torch.float64, "cpu")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: attention(*t, backend="cpu", **kwargs), leaves)


@CPU
@pytest.mark.parametrize("causal,window", [(True, None), (False, (9, 4))], ids=["causal", "window"])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_fp64_cpu_is_exact(causal, window, capability):
    """The fp64 path (the one gradcheck sees) computes in fp64 throughout, gradients included (its
    backward recomputes lse in fp64: the saved one is float32)."""
    q, k, v = _dense_inputs((2, 4, 2, 17, 129, 40, causal, window), torch.float64, "cpu")
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    ours = _grads(lambda *t: attention(*t, causal=causal, window=window, return_lse=True, backend="cpu"),
                  q, k, v, grad_out)
    ref = _grads(lambda *t: attention_reference(*t, causal=causal, window=window, return_lse=True),
                 q, k, v, grad_out)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        if name == "lse":
            torch.testing.assert_close(a, b.float(), msg=name)  # float32 by contract
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 4, 2, 96, 96, 64), (1, 4, 1, 150, 150, 64)], ids=["grouped", "split"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_is_deterministic(backend, shape, deterministic):
    """The guarantee of `deterministic=` (documented in attention's docstring): two backward runs
    give the same bits on every backend, whichever value is passed (the two shapes take the cpu
    backward's two schedules)."""
    if backend == "triton" and INTERPRETED:
        shape = (1, 2, 1, 24, 24, 32)
    B, Hq, Hkv, T, S, D = shape
    dtype = torch.float16 if backend == "triton" and INTERPRETED else torch.bfloat16
    q, k, v = _dense_inputs((B, Hq, Hkv, T, S, D, True, None), dtype, device_for(backend))
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    fn = lambda *t: attention(*t, causal=True, return_lse=True, deterministic=deterministic,  # noqa: E731
                              backend=backend)
    first = _grads(fn, q, k, v, grad_out)
    second = _grads(fn, q, k, v, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@CPU
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_results_do_not_depend_on_thread_count(capability):
    """The cpu backward picks its schedule from the thread count; both give the same bits."""
    q, k, v = _dense_inputs((2, 4, 2, 80, 80, 64, True, None), torch.bfloat16, "cpu")
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    fn = lambda *t: attention(*t, causal=True, return_lse=True, backend="cpu")  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 4 (doc, kv head) pairs >= 4 per thread: grouped
        one = _grads(fn, q, k, v, grad_out)
        torch.set_num_threads(2)  # fewer than 4 per thread: split
        two = _grads(fn, q, k, v, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@CPU
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_saved_bytes_are_q_k_v_out_lse(packed):
    if packed:
        q, k, v, cu, max_len = _packed_inputs([30, 34], 4, 2, 64, torch.bfloat16, "cpu")
        kwargs = {"cu_seqlens": cu, "max_seqlen": max_len}
    else:
        q, k, v = _dense_inputs((2, 4, 2, 64, 64, 64, True, None), torch.bfloat16, "cpu")
        kwargs = {}
    leaves = [t.requires_grad_() for t in (q, k, v)]
    saved, out = saved_tensor_bytes(attention, *leaves, causal=True, backend="cpu", **kwargs)
    lse_bytes = q[..., 0].numel() * 4
    expected = 2 * (q.numel() + k.numel() + v.numel() + out.numel()) + lse_bytes
    if packed:
        expected += cu.numel() * 4
    assert saved == expected
    reference_saved, _ = saved_tensor_bytes(attention_reference, *leaves, causal=True, **kwargs)
    assert reference_saved > saved


def test_gpu_kernel_limits_are_known_before_running():
    """What the triton and cuda kernels cannot take is decided before the call (so that it also
    holds under torch.compile): float64 anywhere, head dims outside 16..256, and for the CUDA
    kernels float32 and head dims that are not multiples of 8."""
    unsupported = attention_op._unsupported
    assert unsupported("cpu", torch.empty(1, 1, 1, 8, dtype=torch.float64)) is None
    assert unsupported("triton", torch.empty(1, 1, 1, 64, dtype=torch.float64)) == "float64"
    assert "head dim 8" in unsupported("triton", torch.empty(1, 1, 1, 8))
    assert unsupported("triton", torch.empty(1, 1, 1, 40)) is None
    assert "float32" in unsupported("cuda", torch.empty(1, 1, 1, 64))
    assert "multiple of 8" in unsupported("cuda", torch.empty(1, 1, 1, 36, dtype=torch.bfloat16))
    assert unsupported("cuda", torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)) is None
    big = torch.empty(1, 1, 1, 256, dtype=torch.bfloat16)
    assert unsupported("cuda", big) is None                      # forward only: the CUDA kernel takes it
    assert "backward takes up to 128" in unsupported("cuda", big, needs_grad=True)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_falls_back_for_float64(backend, monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    q, k, v = _dense_inputs((1, 2, 1, 8, 8, 16, True, None), torch.float64, device_for(backend))
    with pytest.warns(UserWarning, match="the triton backend does not support float64"):
        out = attention(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True))
    monkeypatch.setenv("SLMFAST_STRICT", "1")
    with pytest.raises(ValueError, match="forbids fallbacks"):
        attention(q, k, v, causal=True, backend=backend)


def test_lse_is_not_differentiable():
    q, k, v = _dense_inputs((1, 2, 2, 8, 8, 16, True, None), torch.float32, "cpu")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


# ---- registration: opcheck and torch.compile ----------------------------------------------

def _fwd_op(backend):
    return (torch.ops.slmfast_triton.attention_fwd if backend == "triton"
            else torch.ops.slmfast.attention_fwd)


def _bwd_op(backend):
    return (torch.ops.slmfast_triton.attention_bwd if backend == "triton"
            else torch.ops.slmfast.attention_bwd)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_opcheck(backend, packed):
    device = device_for(backend)
    if packed:
        q, k, v, cu, max_len = _packed_inputs([5, 1, 10], 4, 2, 16, torch.float32, device)
        layout = (cu, cu, max_len, max_len)
    else:
        q, k, v = _dense_inputs((2, 4, 2, 9, 12, 16, True, None), torch.float32, device)
        layout = (None, None, 0, 0)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.25, True, 4, -1, *layout)
    torch.library.opcheck(_fwd_op(backend), args)
    out, lse = _fwd_op(backend)(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.25, True, 4, -1,
                *layout, True)
    torch.library.opcheck(_bwd_op(backend), bwd_args)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_compiles_fullgraph(backend, packed):
    device = device_for(backend)
    if packed:
        q, k, v, cu, max_len = _packed_inputs([7, 12, 1], 4, 2, 32, torch.float32, device)
        kwargs = {"cu_seqlens": cu, "max_seqlen": max_len}
    else:
        q, k, v = _dense_inputs((2, 4, 2, 16, 16, 32, True, None), torch.float32, device)
        kwargs = {}

    def block(q_, k_, v_):
        out = attention(q_ * 2, k_, v_, causal=True, window=(6, -1), backend=backend, **kwargs)
        return (out * out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = compiled(*leaves)
    loss.backward()
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = block(*eager_leaves)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def _qkv(self, T=8, Hq=4, Hkv=2, D=16, dtype=torch.float32):
        return (torch.randn(2, Hq, T, D, dtype=dtype), torch.randn(2, Hkv, T, D, dtype=dtype),
                torch.randn(2, Hkv, T, D, dtype=dtype))

    def test_integer_q(self, backend):
        q, k, v = (t.to(torch.int32) for t in self._qkv())
        with pytest.raises(ValueError, match="attention: q must have a floating dtype"):
            attention(q, k, v, backend=backend)

    def test_dtype_mix(self, backend):
        q, k, v = self._qkv()
        with pytest.raises(ValueError, match=r"v must have the dtype of q \(float32\), got bfloat16"):
            attention(q, k, v.bfloat16(), backend=backend)

    def test_mismatched_head_dims(self, backend):
        q, k, v = self._qkv()
        with pytest.raises(ValueError, match=r"k must have the head dimension of q \(16\), got 24"):
            attention(q, torch.randn(2, 2, 8, 24), torch.randn(2, 2, 8, 24), backend=backend)

    def test_v_shape(self, backend):
        q, k, _ = self._qkv()
        with pytest.raises(ValueError, match=r"v must have shape \(2, 2, 8, 16\)"):
            attention(q, k, torch.randn(2, 2, 9, 16), backend=backend)

    def test_heads_not_a_multiple(self, backend):
        q, k, v = self._qkv(Hq=4, Hkv=3)
        with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of the number of "
                                             r"key/value heads \(3\)"):
            attention(q, k, v, backend=backend)

    def test_wrong_rank(self, backend):
        q, k, v = self._qkv()
        with pytest.raises(ValueError, match=r"q must have shape \(B, H, T, D\)"):
            attention(q[0], k[0], v[0], backend=backend)

    def test_device_mix(self, backend):
        q, k, v = self._qkv()
        with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
            attention(q, k.to("meta"), v, backend=backend)

    def test_bad_window(self, backend):
        q, k, v = self._qkv()
        with pytest.raises(ValueError, match=r"window sides must be >= -1"):
            attention(q, k, v, window=(-2, 0), backend=backend)
        with pytest.raises(ValueError, match=r"window must be None or a pair of ints"):
            attention(q, k, v, window=4, backend=backend)

    def _packed(self):
        return (torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16))

    def test_cu_seqlens_not_int32(self, backend):
        q, k, v = self._packed()
        with pytest.raises(ValueError, match="cu_seqlens must have dtype int32, got int64"):
            attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 10]), max_seqlen=6, backend=backend)

    def test_cu_seqlens_decreasing(self, backend):
        q, k, v = self._packed()
        cu = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
            attention(q, k, v, cu_seqlens=cu, backend=backend)

    def test_cu_seqlens_ends(self, backend):
        q, k, v = self._packed()
        with pytest.raises(ValueError, match="cu_seqlens must start at 0, got 1"):
            attention(q, k, v, cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32), backend=backend)
        with pytest.raises(ValueError, match=r"cu_seqlens must end at the number of rows of q \(10\), got 9"):
            attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), backend=backend)

    def test_max_seqlen_too_small(self, backend):
        q, k, v = self._packed()
        cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"max_seqlen \(5\) is smaller than the longest document "
                                             r"\(6 rows\)"):
            attention(q, k, v, cu_seqlens=cu, max_seqlen=5, backend=backend)

    def test_cu_seqlens_on_another_device(self, backend):
        q, k, v = self._packed()
        with pytest.raises(ValueError, match="cu_seqlens is on meta but q is on cpu"):
            attention(q, k, v, cu_seqlens=torch.zeros(3, dtype=torch.int32, device="meta"),
                      max_seqlen=6, backend=backend)


@CPU
class TestRawOpChecks:
    """The registered C++ ops check their arguments themselves (callable without the wrapper)."""

    def _call(self, q, k, v, cu=None, max_len=0, causal=False, window=(-1, -1)):
        return torch.ops.slmfast.attention_fwd(q, k, v, 0.25, causal, *window, cu, cu, max_len, max_len)

    def test_head_dims(self):
        with pytest.raises(RuntimeError, match=r"attention_fwd: k must have the head dimension of q \(16\)"):
            self._call(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))

    def test_heads_multiple(self):
        with pytest.raises(RuntimeError, match=r"attention_fwd: the number of query heads \(3\) must be a "
                                               r"multiple"):
            self._call(torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))

    def test_dtype_mix(self):
        with pytest.raises(RuntimeError, match="attention_fwd: k must have dtype Float"):
            self._call(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16).double(), torch.randn(1, 2, 4, 16))

    def test_cu_seqlens_dtype(self):
        q = torch.randn(6, 2, 16)
        with pytest.raises(RuntimeError, match="attention_fwd: cu_seqlens_q must have dtype int32, got Long"):
            self._call(q, q, q, torch.tensor([0, 2, 6]), 4)

    def test_cu_seqlens_decreasing(self):
        q = torch.randn(6, 2, 16)
        with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
            self._call(q, q, q, torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4)

    def test_max_seqlen(self):
        q = torch.randn(6, 2, 16)
        with pytest.raises(RuntimeError, match="cu_seqlens_q: document 1 has 4 rows, more than max_seqlen 3"):
            self._call(q, q, q, torch.tensor([0, 2, 6], dtype=torch.int32), 3)

    def test_window(self):
        q = torch.randn(1, 2, 4, 16)
        with pytest.raises(RuntimeError, match="attention_fwd: window_left must be >= -1"):
            self._call(q, q, q, window=(-3, 0))

    def test_bwd_lse_shape(self):
        q = torch.randn(1, 2, 4, 16)
        with pytest.raises(RuntimeError, match=r"attention_bwd: lse must have shape \[1, 2, 4\]"):
            torch.ops.slmfast.attention_bwd(q, q, q, q, q, torch.randn(1, 2, 5), 0.25, False, -1, -1,
                                            None, None, 0, 0, True)


# ---- scaled_dot_product_attention --------------------------------------------------------

def _sdpa_check(query, key, value, **kwargs):
    """slmfast's SDPA against torch's in the same dtype and in float64 (the tolerance rule)."""
    grad_out = None
    results = []
    for fn, cast in ((scaled_dot_product_attention, None),
                     (torch.nn.functional.scaled_dot_product_attention, None),
                     (torch.nn.functional.scaled_dot_product_attention, torch.float64)):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (query, key, value)]
        out = fn(*leaves, **kwargs)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64)
        grads = torch.autograd.grad((out.double() * grad_out).sum(), leaves)
        results.append((out, *grads))
    for name, ours, theirs, ref in zip(("out", "dq", "dk", "dv"), *results):
        assert_close(name, ours, theirs, ref)


@pytest.fixture
def no_torch_sdpa(monkeypatch):
    """Fails the test if slmfast's SDPA falls back to torch's."""
    def refuse(*args, **kwargs):
        raise AssertionError("fell back to torch's scaled_dot_product_attention")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_matches_torch(is_causal, dtype):
    q = torch.randn(2, 4, 33, 40, dtype=dtype)
    k = torch.randn(2, 2, 33, 40, dtype=dtype)
    v = torch.randn(2, 2, 33, 40, dtype=dtype)
    _sdpa_check(q, k, v, is_causal=is_causal, enable_gqa=True, scale=0.2)


def test_sdpa_uses_the_fused_op(no_torch_sdpa):
    q, k, v = (torch.randn(3, 2, 17, 16) for _ in range(3))
    causal_mask = torch.ones(17, 17, dtype=torch.bool).tril()
    expected = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert_close("out", scaled_dot_product_attention(q, k, v, is_causal=True),
                 attention_reference(q, k, v, causal=True), expected)
    assert_close("out", scaled_dot_product_attention(q, k, v, attn_mask=causal_mask),
                 attention_reference(q, k, v, causal=True), expected)
    out3 = scaled_dot_product_attention(q[0], k[0], v[0])  # 3-D inputs
    assert out3.shape == (2, 17, 16)


def test_sdpa_more_queries_than_keys_is_top_left_causal():
    """SDPA's is_causal is top-left aligned when L != S; the fused op covers L > S with a window."""
    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    _sdpa_check(q, k, v, is_causal=True)


@pytest.mark.parametrize("kind", ["float_mask", "dropout", "fewer_queries"])
def test_sdpa_falls_back_with_one_warning(kind, fresh_warnings, monkeypatch):
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    kwargs = {"float_mask": {"attn_mask": torch.randn(6, 9)}, "dropout": {"dropout_p": 0.5},
              "fewer_queries": {"is_causal": True}}[kind]
    with pytest.warns(UserWarning, match="scaled_dot_product_attention: the fused op does not take"):
        out = scaled_dot_product_attention(q, k, v, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_dot_product_attention(q, k, v, **kwargs)  # the warning is given once
    assert out.shape == (1, 2, 6, 16)
    if kind != "dropout":
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs))
    monkeypatch.setenv("SLMFAST_STRICT", "1")
    with pytest.raises(ValueError, match="SLMFAST_STRICT=1 forbids fallbacks"):
        scaled_dot_product_attention(q, k, v, **kwargs)


def test_sdpa_default_scale_is_one_over_sqrt_e():
    q, k, v = (torch.randn(1, 1, 5, 36) for _ in range(3))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v),
                               attention(q, k, v, scale=1 / math.sqrt(36)))
