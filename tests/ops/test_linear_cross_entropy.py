"""linear_cross_entropy on every available backend against the unfused float64 reference."""

import pytest
import torch

from slmfast import backends
from slmfast.functional import linear_cross_entropy
from slmfast.ops import _loss_chunks as C
from slmfast.ops import _loss_math as M
from slmfast.ops.linear_cross_entropy import linear_cross_entropy_reference
from tests.helpers import (
    assert_close,
    backend_params,
    cpu_capability_params,
    device_for,
    saved_tensor_bytes,
    value_and_grads,
)

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params()
CPU_BACKENDS = [b for b in BACKENDS if device_for(b.values[0]).type == "cpu"]  # where bf16 takes two passes
INTERPRETED = not torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {
    "plain": {},
    "bias_smooth": {"bias": True, "label_smoothing": 0.1},
    "softcap_sum": {"softcap": 4.0, "reduction": "sum"},
    "none_bias_softcap": {"reduction": "none", "bias": True, "softcap": 2.5},
}


def _inputs(n, h, v, dtype, device, bias=False, ignore_every=4):
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) / h ** 0.5 * 2).to(dtype)
    b = (torch.randn(v, device=device) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), device=device)
    target[::ignore_every] = -100
    return hidden, weight, b, target


def _check(backend, hidden, weight, bias, target, chunk_size=None, **options):
    g = torch.randn(target.shape, dtype=torch.float64, device=hidden.device) \
        if options.get("reduction") == "none" else None

    def ours(h, w, b=None):
        return linear_cross_entropy(h, w, target, b, chunk_size=chunk_size, backend=backend, **options)

    def ref(h, w, b=None):
        return linear_cross_entropy_reference(h, w, target, b, **options)

    def ref64(h, w, b=None):
        return ref(h.double(), w.double(), b.double() if b is not None else None)

    args = (hidden, weight) if bias is None else (hidden, weight, bias)
    got, base, exact = (value_and_grads(f, *args, grad_output=g) for f in (ours, ref, ref64))
    assert got[0].dtype == hidden.dtype
    assert_close("loss", got[0], base[0], exact[0])
    for name, a, b, c in zip(("dhidden", "dweight", "dbias"), got[1], base[1], exact[1]):
        assert a.dtype == hidden.dtype
        assert_close(name, a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_fp64_reference(backend, dtype, option):
    options = dict(OPTIONS[option])
    bias = options.pop("bias", False)
    hidden, weight, bias, target = _inputs(29, 24, 133, dtype, device_for(backend), bias=bias)
    _check(backend, hidden, weight, bias, target, chunk_size=8, **options)  # 29 rows: chunks of 8, 8, 8, 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_not_a_multiple_of_the_block_and_default_chunk(backend):
    v = 1001 if backend == "triton" and INTERPRETED else 32001
    hidden, weight, bias, target = _inputs(9, 16, v, torch.float32, device_for(backend), bias=True)
    _check(backend, hidden, weight, bias, target, label_smoothing=0.05)


# ---- bf16/fp16 on the CPU: the two-pass path (tile-by-tile weight gradient) ------------------

TWO_PASS_OPTIONS = {
    "mean": {},
    "bias_smooth_sum": {"bias": True, "label_smoothing": 0.1, "reduction": "sum"},
    "softcap_none": {"softcap": 3.0, "reduction": "none"},
    "all_num_items": {"bias": True, "label_smoothing": 0.05, "softcap": 5.0, "num_items": 97},
    "ignore_index_in_vocab": {"ignore_index": 7, "label_smoothing": 0.2},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("option", list(TWO_PASS_OPTIONS))
def test_two_pass_odd_shapes_match_fp64_reference(backend, dtype, option):
    """150 tokens, V = 300: pass 1 in chunks of 32 (the last 22 rows), pass 2 in tiles of 64
    vocabulary rows (the last 44) and chunks of 64 tokens summed in float32 (the last 22); rows
    32-63 (one whole pass-1 chunk) and 64-127 (one whole pass-2 chunk) are all ignored."""
    options = dict(TWO_PASS_OPTIONS[option])
    bias = options.pop("bias", False)
    ignore = options.get("ignore_index", -100)
    hidden, weight, bias, _ = _inputs(150, 16, 300, dtype, device_for(backend), bias=bias)
    target = torch.randint(0, 300, (150,), device=hidden.device)
    target[target == ignore] = ignore + 1
    target[::5] = ignore
    target[32:128] = ignore
    if device_for(backend).type == "cpu":
        assert C.two_pass_sizes(150, 16, 300, 32) == (32, 64, 64, 64)  # the shapes the docstring names
    _check(backend, hidden, weight, bias, target, chunk_size=32, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["plain", "smooth_zloss_softcap"])
def test_tile_gradient_equals_the_row_gradient(backend, option):
    """C.ce_tile_grad on column tiles of a row (the kernels' in-place backward plus the fixed
    target column, or M.ce_tile_grad_ for torch) writes the gradient ce_rows_torch writes on the
    full row, z-loss included (linear_cross_entropy has no z-loss; the tile gradient does)."""
    device = device_for(backend)
    smooth, z_loss, cap = (0.15, 1e-3, 4.0) if option != "plain" else (0.0, 0.0, 0.0)
    rows, cols = 23, 250
    logits = torch.randn(rows, cols, device=device) * 3
    target = torch.randint(0, cols, (rows,), device=device)
    target[::4] = -100
    logits[4] = float("nan")  # an ignored row: exactly 0 whatever it holds
    scale = torch.rand(rows, device=device) + 0.5
    expected = logits.clone()
    _, lse = M.ce_rows_torch(expected, target, scale, -100, smooth, z_loss, cap)
    stats = torch.stack([lse, torch.zeros_like(lse)], 1)
    if backend != "torch":
        stats = C.ce_rows(backend, logits.clone(), target, None, -100, smooth, z_loss, cap, True)[1]
    got = logits.clone()
    for c0 in range(0, cols, 64):  # tiles of 64 columns, the last 58
        tile = got[:, c0:c0 + 64].contiguous()
        got[:, c0:c0 + 64] = C.ce_tile_grad(backend, tile, target, stats, scale, c0, cols, -100, smooth,
                                            z_loss, cap)
    assert torch.equal(got[4], torch.zeros_like(got[4]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_two_pass_empty_batch_gives_zero_gradients(backend, reduction):
    device = device_for(backend)
    hidden = torch.randn(0, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(40, device=device, dtype=torch.bfloat16, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), bias,
                                reduction=reduction, backend=backend)
    loss.sum().backward()
    assert loss.sum().item() == 0.0
    for g in (weight.grad, bias.grad):
        assert g is None or torch.equal(g, torch.zeros_like(g))


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
def test_float32_chunks_keep_within_twice_their_share_of_the_floor():
    """float32 on the CPU: a chunk's logits take at most 10% of the floor (2 (N + V) H elements)
    even where the 256-row minimum would take more (large V at H = 1024), and 256 rows otherwise."""
    cpu = torch.device("cpu")
    for n, h, v in [(8192, 1024, 32768), (8192, 1024, 131072), (8192, 1024, 152064), (8192, 2048, 152064)]:
        c = C.default_chunk_size(n, h, v, cpu, torch.float32)
        assert c * v <= 2 * C.FLOOR_SLACK * 2 * (n + v) * h, (n, h, v, c)
        assert c >= C.MIN_CHUNK_CPU_FLOAT or 2 * c * v > 2 * C.FLOOR_SLACK * 2 * (n + v) * h, (n, h, v, c)
    assert C.default_chunk_size(8192, 1024, 32768, cpu, torch.float32) == 256


def test_two_pass_sizes_keep_to_their_share_of_the_floor():
    for n, h, v in [(8192, 1024, 32768), (8192, 2048, 131072), (8192, 2048, 152064), (4096, 1024, 512)]:
        floor = 2 * (n + v) * h
        c, ct, vt, r = C.two_pass_sizes(n, h, v)
        assert c * v <= C.FLOOR_SLACK * floor and ct * vt <= C.TILE_SLACK * floor, (n, h, v)
        assert ct == r == n  # every tile in one GEMM over all tokens, its gradient rebuilt in place
        _, _, _, r = C.two_pass_sizes(n, h, v, float_temporaries=True)
        assert 4 * r * vt <= C.TILE_SLACK * floor


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_two_pass_allocates_no_float32_weight_sized_tensor(dtype):
    """bf16/fp16 on the CPU: no tensor of V x H float32 (twice the weight gradient) at any point
    of the forward and backward (the one-pass loop summed grad_W over chunks in one)."""
    from torch.profiler import ProfilerActivity, profile

    n, h, v = 64, 32, 2000
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (n,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        linear_cross_entropy(hidden, weight, target, bias, chunk_size=16, backend="cpu").backward()
    sizes = {e.name: e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::")}
    largest = max(sizes.values())
    assert 0 < largest < v * h * 4, f"{max(sizes, key=sizes.get)} allocated {largest} bytes"
    assert weight.grad.dtype == dtype and bias.grad is not None


def test_two_pass_runs_on_meta_with_tokens_summed_per_tile():
    """N large against V (N = 300, V = 1000): pass 2 sums each tile's gradient over token chunks
    (the C++ accumulation op, which has no meta kernel); on meta (slmfast memory's device) the
    loop takes its shape-only fallback instead of failing."""
    assert C.two_pass_sizes(300, 64, 1000)[1] < 300  # the summed path
    h = torch.empty(300, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(1000, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    linear_cross_entropy(h, w, torch.empty(300, device="meta", dtype=torch.long)).backward()
    assert w.grad.shape == (1000, 64) and h.grad.shape == (300, 64)


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
def test_two_pass_saves_no_weight_gradient():
    """bf16 on the CPU: the forward keeps grad_hidden and 2 floats per token; the weight's
    gradient is computed in the backward, so nothing of V x H is held from one to the other."""
    n, h, v = 64, 32, 500
    hidden = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (n,))
    saved, loss = saved_tensor_bytes(linear_cross_entropy, hidden, weight, target, backend="cpu",
                                     exclude=(hidden, weight, target))
    assert saved == n * h * 2 + n * 2 * 4 + 4  # grad_hidden, the stats, the mean's scale
    loss.backward()
    assert weight.grad.shape == (v, h) and hidden.grad.shape == (n, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_with_bf16_hidden(backend):
    device = device_for(backend)
    hidden, weight, _, target = _inputs(13, 32, 70, torch.bfloat16, device)
    weight = weight.float()
    got = value_and_grads(lambda h, w: linear_cross_entropy(h, w, target, chunk_size=4, backend=backend),
                          hidden, weight)
    # F.linear's autocast semantics: the weight is cast to bf16 for the GEMM
    base = value_and_grads(lambda h, w: linear_cross_entropy_reference(h, w.bfloat16(), target),
                           hidden, weight)
    exact = value_and_grads(
        lambda h, w: linear_cross_entropy_reference(h.double(), w.bfloat16().double(), target),
        hidden, weight)
    assert got[1][1].dtype == torch.float32
    assert_close("loss", got[0], base[0], exact[0])
    assert_close("dhidden", got[1][0], base[1][0], exact[1][0])
    assert_close("dweight", got[1][1], base[1][1], exact[1][1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("cpu", "torch")])
def test_under_cpu_autocast(backend):
    hidden, weight, _, target = _inputs(11, 16, 50, torch.float32, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = value_and_grads(lambda h, w: linear_cross_entropy(h, w, target, backend=backend),
                              hidden, weight)
        base = value_and_grads(lambda h, w: linear_cross_entropy_reference(h, w, target), hidden, weight)
    exact = value_and_grads(lambda h, w: linear_cross_entropy_reference(h.bfloat16().double(),
                                                                        w.bfloat16().double(), target),
                            hidden, weight)
    assert got[0].dtype == base[0].dtype == torch.float32  # as F.cross_entropy under autocast
    assert_close("loss", got[0], base[0], exact[0])
    for name, a, b, c in zip(("dhidden", "dweight"), got[1], base[1], exact[1]):
        assert_close(name, a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    device = device_for(backend)
    hidden, weight, _, target = _inputs(10, 8, 40, torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, target, chunk_size=3, backend=backend)  # weight needs no grad
    loss.backward()
    expected = value_and_grads(lambda x: linear_cross_entropy_reference(x.double(), weight.double(), target),
                               hidden)
    torch.testing.assert_close(h.grad.double(), expected[1][0].double(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, target, backend=backend)
    torch.testing.assert_close(value.double(), expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_gradient_accumulation_equals_one_big_batch(backend):
    device = device_for(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, _, target = _inputs(40, 12, 57, dtype, device, ignore_every=3)
    total = int((target != -100).sum())
    full = value_and_grads(lambda h, w: linear_cross_entropy(h, w, target, backend=backend), hidden, weight)
    w_leaf = weight.clone().requires_grad_()
    acc_loss, grads_h = 0.0, []
    for part in (slice(0, 17), slice(17, 40)):  # micro-batches of unequal token counts
        h_leaf = hidden[part].clone().requires_grad_()
        loss = linear_cross_entropy(h_leaf, w_leaf, target[part], num_items=total, chunk_size=5,
                                    backend=backend)
        loss.backward()
        acc_loss, grads_h = acc_loss + loss.detach(), grads_h + [h_leaf.grad]
    torch.testing.assert_close(acc_loss, full[0])
    torch.testing.assert_close(torch.cat(grads_h), full[1][0])
    torch.testing.assert_close(w_leaf.grad, full[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_not_nan(backend):
    device = device_for(backend)
    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    weight = torch.randn(20, 8, device=device, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((6,), -100, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(reduction, capability):
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 10, -100, 3, 3, 5, 1])

    def fn(h, w, b):
        return linear_cross_entropy(h, w, target, b, label_smoothing=0.1, softcap=3.0, reduction=reduction,
                                    chunk_size=3, backend="cpu")

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
def test_saved_bytes_are_the_gradients_not_the_logits():
    n, h, v = 64, 32, 500
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    target = torch.randint(0, v, (n,))
    saved, _ = saved_tensor_bytes(linear_cross_entropy, hidden, weight, target, chunk_size=16, backend="cpu")
    assert saved == (n * h + v * h) * 4  # grad_hidden and grad_weight, computed in the forward
    unfused, _ = saved_tensor_bytes(linear_cross_entropy_reference, hidden, weight, target)
    assert unfused >= n * v * 4


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
def test_backward_allocates_nothing_of_the_gradients_size():
    """The backward hands over the gradients the forward computed: no tensor as large as a
    gradient is made during it (autograd used to fill the op's unused gradient outputs with
    zeros of grad_hidden's and grad_weight's size, a second copy of both at the step's peak)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, h, v = 64, 32, 500
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    target = torch.randint(0, v, (n,))

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new memory
                    self.largest = max(self.largest, t.numel())
            return out

    loss = linear_cross_entropy(hidden, weight, target, chunk_size=16, backend="cpu")
    with Sizes() as sizes:
        loss.backward()
    assert sizes.largest < n * h, f"the backward made a tensor of {sizes.largest} elements"
    assert weight.grad is not None and hidden.grad is not None


# ---- registration: opcheck and torch.compile ----------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    hidden, weight, bias, target = _inputs(9, 8, 30, torch.float32, device, bias=True)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    scale = torch.tensor(0.25, device=device)
    ops = torch.ops.slmfast_loss
    torch.library.opcheck(ops.linear_cross_entropy_fused,
                          (h, w, b, target, scale, -100, 0.1, 3.0, 4, True, True, True, backend))
    torch.library.opcheck(ops.linear_cross_entropy_rows,
                          (h, w, None, target, -100, 0.0, 0.0, 4, backend))
    torch.library.opcheck(ops.linear_cross_entropy_rows_bwd,
                          (torch.randn(9, device=device), hidden, weight, bias, target, -100, 0.0, 2.0, 4,
                           True, True, True, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_two_pass(backend):
    """The bf16 CPU path's two ops: the first pass (forward) and the second (the weight's
    gradient, called by the first one's backward)."""
    hidden, weight, bias, target = _inputs(9, 8, 300, torch.bfloat16, "cpu", bias=True)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    scale = torch.tensor(0.25)
    ops = torch.ops.slmfast_loss
    torch.library.opcheck(ops.linear_cross_entropy_first_pass,
                          (h, w, b, target, scale, -100, 0.1, 3.0, 4, True, backend))
    _, _, stats = ops.linear_cross_entropy_first_pass(hidden, weight, bias, target, scale, -100, 0.1, 3.0, 4,
                                                      False, backend)
    torch.library.opcheck(ops.linear_cross_entropy_second_pass,
                          (hidden, weight, bias, target, stats, scale, -100, 0.1, 3.0, 4, True, True,
                           backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiles_fullgraph(backend, reduction, dtype):
    device = device_for(backend)
    if dtype == torch.bfloat16 and device.type != "cpu":
        pytest.skip("bf16 here is for the CPU's two-pass ops")
    hidden, weight, _, target = _inputs(12, 16, 45, dtype, device)

    def step(h, w):
        loss = linear_cross_entropy(h * 1.5, w, target, chunk_size=5, reduction=reduction, backend=backend,
                                    num_items=torch.tensor(7.0) if reduction == "mean" else None)
        return loss.sum() * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = value_and_grads(compiled, hidden, weight)
    expected = value_and_grads(step, hidden, weight)
    torch.testing.assert_close(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def test_target_out_of_range(self, backend):
        with pytest.raises(ValueError, match=r"target\[2\] = 30 is out of range \[0, 30\)"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([1, 2, 30]),
                                 backend=backend)

    def test_mismatched_hidden_size(self, backend):
        with pytest.raises(ValueError, match=r"hidden has hidden size 8 but weight has shape \(30, 9\)"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 9), torch.tensor([1, 2, 3]),
                                 backend=backend)

    def test_bias_shape(self, backend):
        with pytest.raises(ValueError, match=r"bias must have shape \(30,\)"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([1, 2, 3]),
                                 torch.randn(29), backend=backend)

    def test_target_shape(self, backend):
        with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([1, 2]), backend=backend)

    def test_bad_reduction(self, backend):
        with pytest.raises(ValueError, match="reduction must be one of"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([1, 2, 3]),
                                 reduction="batchmean", backend=backend)

    def test_bad_softcap_and_chunk(self, backend):
        with pytest.raises(ValueError, match="softcap must be > 0"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([1, 2, 3]), softcap=-1.0,
                                 backend=backend)
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 8), torch.tensor([1, 2, 3]),
                                 chunk_size=-1, backend=backend)

    def test_weight_dtype_mix(self, backend):
        with pytest.raises(ValueError, match="weight must have the dtype of hidden"):
            linear_cross_entropy(torch.randn(3, 8), torch.randn(30, 8, dtype=torch.float16),
                                 torch.tensor([1, 2, 3]), backend=backend)
