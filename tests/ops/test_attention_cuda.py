"""GPU tests of the CUDA attention kernels (csrc/cuda/attention_fwd.cu, attention_bwd.cu).

Every test is marked `gpu` (skipped without a GPU; run by benchmarks/gpu_check.sh) and calls
torch.ops.slmfast.attention_fwd / attention_bwd directly, so that it does not depend on the
Python wrapper's dispatch. Each case is compared with tests.helpers.attention_oracle, the
contract of slmfast/ops/attention.py in plain PyTorch: run in float64 it is the oracle, run in
the input dtype it is the baseline of tests.helpers.assert_close
(err(ours) <= 2 x err(baseline) + a tiny floor, docs/architecture.md §5). Outputs, lse and all three
input gradients are compared; rows that see no key must give out 0, lse -inf and zero gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import assert_close, attention_oracle

pytestmark = pytest.mark.gpu


# ------------------------------------------------------------------------------------------------
# The ops under test. Module-level so that a harness can substitute a build of the same launchers.

def attention_fwd_op(q, k, v, scale, causal, window_left, window_right, cu_q, cu_k, max_q, max_k):
    return torch.ops.slmfast.attention_fwd(q, k, v, scale, causal, window_left, window_right, cu_q, cu_k,
                                           max_q, max_k)


def attention_bwd_op(dout, q, k, v, out, lse, scale, causal, window_left, window_right, cu_q, cu_k, max_q,
                     max_k, deterministic):
    return torch.ops.slmfast.attention_bwd(dout, q, k, v, out, lse, scale, causal, window_left, window_right,
                                           cu_q, cu_k, max_q, max_k, deterministic)


def cuda_ops_available() -> tuple[bool, str]:
    """Whether slmfast._C was built with the CUDA kernels (and a GPU is here)."""
    from slmfast import backends

    state = backends.status("cuda")
    return state.available, state.reason


@pytest.fixture(autouse=True)
def _need_cuda_ops():
    ok, why = cuda_ops_available()
    if not ok:
        pytest.skip(f"CUDA attention kernels unavailable: {why}")


# ------------------------------------------------------------------------------------------------
# One case end to end.

def make_inputs(B, Hq, Hkv, T, S, D, dtype, lengths_q=None, lengths_k=None):
    dev = torch.device("cuda")
    if lengths_q is None:
        q = torch.randn(B, Hq, T, D, dtype=dtype, device=dev)
        k = torch.randn(B, Hkv, S, D, dtype=dtype, device=dev)
        v = torch.randn(B, Hkv, S, D, dtype=dtype, device=dev)
        return q, k, v, None, None, T, S
    lengths_k = lengths_q if lengths_k is None else lengths_k
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(int(cu_q[-1]), Hq, D, dtype=dtype, device=dev)
    k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, device=dev)
    v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, device=dev)
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


def check_lse(name, ours, base, ref):
    """lse: -inf exactly where the reference is -inf (no visible key), assert_close elsewhere."""
    empty = torch.isneginf(ref)
    assert torch.isneginf(ours[empty]).all(), f"{name}: rows without visible keys must have lse -inf"
    assert_close(name, ours[~empty], base[~empty], ref[~empty])


def assert_grad_close(name, ours, base, ref, cancel_bound):
    """assert_close, except where the exact gradient is identically zero by cancellation.

    When every row sees at most one key (T = S = 1, a window of width 0), P = 1 on that key and
    dS = P (dP - delta) with dP = delta exactly, so dq = 0. Torch's softmax backward cancels to
    exactly 0 there, which would make assert_close's bound 0. The FlashAttention-2 backward
    computes delta = rowsum(dO o O) from the rounded output and dP = dO V^T in fp32 with another
    summation order, so it cancels only up to that fp32 rounding: |dP - delta| <= 2 D eps32
    sum_d |dO_d V_d|, times scale |K| for dq. `cancel_bound` is that worst case; any real error
    (a wrong P, delta or mask) gives values of the order of the gradients themselves.
    """
    if ref.numel() and ref.abs().max().item() == 0.0:
        err = ours.abs().max().item()
        assert err <= cancel_bound, f"{name}: {err:.3e} where the exact gradient is 0 (<= {cancel_bound:.2e})"
    else:
        assert_close(name, ours, base, ref)


def cancellation_bound(q, k, v, dout, scale):
    """Worst-case fp32 residue of dq = scale (P o (dP - delta)) K when dP = delta exactly."""
    D = q.shape[-1]
    eps32 = torch.finfo(torch.float32).eps
    row_l1 = dout.abs().float().sum(-1).max().item()  # max_i sum_d |dO_id|
    return 2.2 * D * eps32 * scale * k.abs().max().item() * row_l1 * v.abs().max().item()


def run_case(B, Hq, Hkv, T, S, D, *, causal=False, window=(-1, -1), dtype=torch.bfloat16, lengths_q=None,
             lengths_k=None, backward=True):
    q, k, v, cu_q, cu_k, max_q, max_k = make_inputs(B, Hq, Hkv, T, S, D, dtype, lengths_q, lengths_k)
    scale = 1.0 / math.sqrt(D)
    out, lse = attention_fwd_op(q, k, v, scale, causal, window[0], window[1], cu_q, cu_k, max_q, max_k)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32

    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    inputs_lp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = dict(scale=scale, causal=causal, window=window, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    ref_out, ref_lse = attention_oracle(*inputs64, **mask)
    base_out, base_lse = attention_oracle(*inputs_lp, **mask)
    assert_close("out", out, base_out, ref_out)
    check_lse("lse", lse, base_lse, ref_lse)
    if not backward:
        return
    dout = torch.randn_like(out)
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, scale, causal, window[0], window[1], cu_q, cu_k,
                                  max_q, max_k, True)
    torch.cuda.synchronize()
    ref_grads = torch.autograd.grad(ref_out, inputs64, dout.double())
    base_grads = torch.autograd.grad(base_out, inputs_lp, dout)
    bound = cancellation_bound(q, k, v, dout, scale)
    for name, ours, base, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), base_grads, ref_grads):
        assert ours.shape == ref.shape and ours.dtype == dtype, name
        assert_grad_close(name, ours, base, ref, bound)


# ------------------------------------------------------------------------------------------------
# Dense layout.

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T,S", [(128, 128), (17, 17), (129, 129), (1, 1), (1, 77), (65, 200), (200, 65)])
def test_dense(T, S, D, causal, dtype):
    run_case(2, 4, 4, T, S, D, causal=causal, dtype=dtype)


@pytest.mark.parametrize("D", [16, 32, 40, 80, 96, 112])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dims(D, causal):
    """Head dims between the tile sizes run on the next tile with zero-filled columns."""
    run_case(2, 3, 3, 129, 129, D, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dim_256_forward(causal):
    run_case(1, 2, 2, 129, 129, 256, causal=causal, backward=False)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 1)], ids=["gqa4", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
def test_gqa(Hq, Hkv, causal, D):
    run_case(2, Hq, Hkv, 150, 150, D, causal=causal)


WINDOWS = [((16, 0), False), ((16, -1), True), ((8, 8), False), ((0, 0), False), ((40, 3), False),
           ((-1, 5), False), ((100, -1), False)]


@pytest.mark.parametrize("window,causal", WINDOWS,
                         ids=["16-0", "16-causal", "8-8", "0-0", "40-3", "none-5", "100-none"])
@pytest.mark.parametrize("T,S", [(257, 257), (100, 300), (300, 100)])
def test_windows(window, causal, T, S):
    run_case(2, 4, 2, T, S, 64, causal=causal, window=window)


def test_fully_masked_rows():
    """T > S with a causal mask: the first T - S rows see no key (out 0, lse -inf, grads 0)."""
    q, k, v, *_ = make_inputs(2, 4, 4, 200, 70, 64, torch.bfloat16)
    out, lse = attention_fwd_op(q, k, v, 0.125, True, -1, -1, None, None, 200, 70)
    assert torch.isneginf(lse[:, :, :130]).all() and torch.isfinite(lse[:, :, 130:]).all()
    assert (out[:, :, :130] == 0).all()
    dq, dk, dv = attention_bwd_op(torch.randn_like(out), q, k, v, out, lse, 0.125, True, -1, -1, None, None,
                                  200, 70, True)
    assert (dq[:, :, :130] == 0).all()
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    run_case(2, 4, 4, 200, 70, 64, causal=True)


# ------------------------------------------------------------------------------------------------
# Packed layout (cu_seqlens).

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (32, -1)),
                                           (False, (7, 9))], ids=["full", "causal", "causal-w32", "w7-9"])
@pytest.mark.parametrize("D", [64, 128])
def test_packed(D, causal, window, dtype):
    """Documents of length 1, unequal lengths, an empty one; GQA 2:1."""
    lengths = [1, 17, 129, 0, 300, 64, 1]
    run_case(0, 4, 2, 0, 0, D, causal=causal, window=window, dtype=dtype, lengths_q=lengths)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_unequal_q_k(causal):
    """Per document T != S (bottom-right aligned per document), including T > S (masked rows)."""
    run_case(0, 4, 1, 0, 0, 64, causal=causal, lengths_q=[5, 130, 1, 70], lengths_k=[40, 129, 3, 20])


# ------------------------------------------------------------------------------------------------
# Determinism, refusals, sizes that fill the GPU.

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_deterministic(causal):
    q, k, v, *_ = make_inputs(2, 8, 2, 1000, 1000, 128, torch.bfloat16)
    out, lse = attention_fwd_op(q, k, v, 0.088, causal, -1, -1, None, None, 1000, 1000)
    dout = torch.randn_like(out)
    first = attention_bwd_op(dout, q, k, v, out, lse, 0.088, causal, -1, -1, None, None, 1000, 1000, True)
    second = attention_bwd_op(dout, q, k, v, out, lse, 0.088, causal, -1, -1, None, None, 1000, 1000, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_refuses_what_it_does_not_run():
    """fp32 inputs and head dims the kernels have no tile for raise NotImplementedError (the op
    then falls back to another backend); so does the backward at D=256."""
    q, k, v, *_ = make_inputs(1, 2, 2, 16, 16, 64, torch.float32)
    with pytest.raises(NotImplementedError, match="dtype"):
        attention_fwd_op(q, k, v, 0.125, False, -1, -1, None, None, 16, 16)
    q, k, v, *_ = make_inputs(1, 2, 2, 16, 16, 20, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="head_dim"):
        attention_fwd_op(q, k, v, 0.125, False, -1, -1, None, None, 16, 16)
    q, k, v, *_ = make_inputs(1, 2, 2, 16, 16, 256, torch.bfloat16)
    out, lse = attention_fwd_op(q, k, v, 0.0625, False, -1, -1, None, None, 16, 16)
    with pytest.raises(NotImplementedError, match="head_dim"):
        attention_bwd_op(torch.randn_like(out), q, k, v, out, lse, 0.0625, False, -1, -1, None, None, 16, 16,
                         True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_large(causal):
    """B=4, H=16, T=4096, D=128 bf16: checked against the reference head by head (the fp64
    reference of all heads at once would not fit)."""
    B, H, T, D = 4, 16, 4096, 128
    q, k, v, *_ = make_inputs(B, H, H, T, T, D, torch.bfloat16)
    scale = 1.0 / math.sqrt(D)
    out, lse = attention_fwd_op(q, k, v, scale, causal, -1, -1, None, None, T, T)
    dout = torch.randn_like(out)
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, scale, causal, -1, -1, None, None, T, T, True)
    torch.cuda.synchronize()
    for b in range(B):
        for h in range(0, H, 4):
            sl = (slice(b, b + 1), slice(h, h + 4))
            inputs64 = [t[sl].detach().double().requires_grad_() for t in (q, k, v)]
            inputs_lp = [t[sl].detach().clone().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = attention_oracle(*inputs64, scale=scale, causal=causal)
            base_out, base_lse = attention_oracle(*inputs_lp, scale=scale, causal=causal)
            assert_close(f"out[{b},{h}:]", out[sl], base_out, ref_out)
            check_lse(f"lse[{b},{h}:]", lse[sl], base_lse, ref_lse)
            ref_grads = torch.autograd.grad(ref_out, inputs64, dout[sl].double())
            base_grads = torch.autograd.grad(base_out, inputs_lp, dout[sl])
            for name, ours, base, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), base_grads, ref_grads):
                assert_close(f"{name}[{b},{h}:]", ours[sl], base, ref)
