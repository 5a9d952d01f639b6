"""cross_entropy on every available backend against the float64 reference (docs/architecture.md
§5)."""

import pytest
import torch

from slmfast import backends
from slmfast.functional import cross_entropy
from slmfast.ops.cross_entropy import cross_entropy_reference
from tests.helpers import assert_close, backend_params, cpu_capability_params, device_for, value_and_grads

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params()
KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "torch"]
# The torch backend computes its rows with the reference's own function (F.cross_entropy plus the
# z-loss term), so the comparisons with the reference run the kernels only.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {
    "plain": {},
    "smooth_zloss": {"label_smoothing": 0.1, "z_loss": 1e-3},
    "sum": {"reduction": "sum", "label_smoothing": 0.05},
    "none": {"reduction": "none", "z_loss": 1e-2},
}


def _inputs(shape, dtype, device, ignore_every=5, offset=10.0):
    # LM-like logits: spread 3, and a per-row offset (a float32 lse of ~30 would lose bits)
    logits = (torch.randn(shape, device=device) * 3 + offset * torch.rand(shape[:-1] + (1,), device=device))
    logits = logits.to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], device=device)
    target.view(-1)[::ignore_every] = -100  # ignored rows everywhere
    return logits, target


def _check(backend, logits, target, **options):
    dtype = logits.dtype
    g = torch.randn(target.shape, dtype=torch.float64, device=logits.device) \
        if options.get("reduction") == "none" else None
    ours = value_and_grads(lambda z: cross_entropy(z, target, backend=backend, **options), logits,
                           grad_output=g)
    base = value_and_grads(lambda z: cross_entropy_reference(z, target, **options), logits, grad_output=g)
    ref = value_and_grads(lambda z: cross_entropy_reference(z.double(), target, **options), logits,
                          grad_output=g)
    assert ours[0].dtype == dtype
    assert_close("loss", ours[0], base[0], ref[0])
    assert_close("dlogits", ours[1][0], base[1][0], ref[1][0])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_fp64_reference(backend, dtype, option):
    logits, target = _inputs((3, 5, 131), dtype, device_for(backend))
    _check(backend, logits, target, **OPTIONS[option])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_not_a_multiple_of_the_block(backend):
    # 32001 (Llama-2 + 1) on the compiled backends; a smaller odd V under the slow interpreter.
    v = 1001 if backend == "triton" and not torch.cuda.is_available() else 32001
    logits, target = _inputs((6, v), torch.float32, device_for(backend), ignore_every=4)
    _check(backend, logits, target, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    logits, target = _inputs((16, 300), torch.float32, device_for(backend), offset=40.0)
    _check(backend, logits, target, z_loss=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (1, 7)], ids=str)
def test_tiny_shapes(backend, shape):
    logits, target = _inputs(shape, torch.float32, device_for(backend), ignore_every=1000)
    _check(backend, logits, target)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend):
    device = device_for(backend)
    h = torch.randn(12, 16, device=device)
    w = torch.randn(67, 16, device=device)
    target = torch.randint(0, 67, (12,), device=device)
    target[3] = -100

    def run(inplace):
        h_, w_ = h.clone().requires_grad_(), w.clone().requires_grad_()
        logits = h_ @ w_.t()
        seen = {}
        logits.register_hook(lambda grad: seen.setdefault("grad", grad))
        loss = cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=inplace, backend=backend)
        loss.backward()
        return loss, h_.grad, w_.grad, logits, seen["grad"]

    loss, gh, gw, logits, dlogits = run(True)
    loss2, gh2, gw2, _, dlogits2 = run(False)
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)
    torch.testing.assert_close(dlogits, dlogits2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gh, gh2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw2, rtol=1e-5, atol=1e-6)
    assert dlogits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    torch.testing.assert_close(logits.detach(), dlogits)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inplace_backward_is_refused_when_another_node_saved_the_logits(backend):
    device = device_for(backend)
    logits = torch.randn(4, 33, device=device, requires_grad=True) * 1.0  # non-leaf
    target = torch.randint(0, 33, (4,), device=device)
    other = (logits ** 2).sum()  # saves logits; created first, so its backward runs after ours
    loss = cross_entropy(logits, target, inplace_backward=True, backend=backend) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_gradient_accumulation_equals_one_big_batch(backend):
    device = device_for(backend)
    logits, target = _inputs((2, 24, 97), torch.float64 if backend != "triton" else torch.float32, device)
    total = int((target != -100).sum())
    full = value_and_grads(lambda z: cross_entropy(z, target, backend=backend), logits)
    acc_loss, acc_grad = 0.0, []
    for i in range(2):  # two micro-batches, each normalized by the whole batch's token count
        loss, (grad,) = value_and_grads(
            lambda z, i=i: cross_entropy(z, target[i], num_items=torch.tensor(total), backend=backend),
            logits[i])
        acc_loss, acc_grad = acc_loss + loss, acc_grad + [grad]
    torch.testing.assert_close(acc_loss, full[0])
    torch.testing.assert_close(torch.stack(acc_grad), full[1][0])
    # an int works the same way
    torch.testing.assert_close(cross_entropy(logits[0], target[0], num_items=total, backend=backend),
                               cross_entropy(logits[0], target[0], reduction="sum", backend=backend) / total)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_not_nan(backend):
    device = device_for(backend)
    logits = torch.randn(5, 40, device=device, requires_grad=True)
    target = torch.full((5,), -100, device=device)
    loss = cross_entropy(logits, target, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_logits(backend):
    device = device_for(backend)
    base = torch.randn(50, 8, device=device)
    logits = base.t()  # (8, 50), last dim strided
    target = torch.randint(0, 50, (8,), device=device)
    _check(backend, logits, target)


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "z_loss": 0.05, "reduction": "sum"},
                                     {"reduction": "none"}], ids=["mean", "smooth_zloss_sum", "none"])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(options, capability):
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, -100, 3, 3, 5])
    assert torch.autograd.gradcheck(lambda z: cross_entropy(z, target, backend="cpu", **options), (logits,))


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
def test_cpu_backward_saves_two_floats_per_row_and_the_logits():
    from tests.helpers import saved_tensor_bytes
    logits = torch.randn(24, 300, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 300, (24,))
    saved, _ = saved_tensor_bytes(cross_entropy, logits, target, backend="cpu")
    # logits (bf16, an input) + target (int64) + (max, log-sum) (2 fp32 per row) + the mean's factor
    assert saved == 24 * 300 * 2 + 24 * 8 + 24 * 8 + 4
    # the usual upcast-then-F.cross_entropy keeps a float32 log-softmax, twice the bytes of the logits
    upcast_saved, _ = saved_tensor_bytes(lambda z, y: cross_entropy_reference(z.float(), y), logits, target)
    assert upcast_saved >= 24 * 300 * 4


# ---- registration: opcheck and torch.compile ----------------------------------------------

def _ops(backend):
    ns = torch.ops.slmfast_triton if backend == "triton" else torch.ops.slmfast
    return ns


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    ns = _ops(backend)
    logits = torch.randn(6, 37, device=device, requires_grad=True)
    target = torch.tensor([1, 0, -100, 36, 5, 2], device=device)
    options = (-100, 0.1, 1e-3, 0.0)
    torch.library.opcheck(ns.cross_entropy_fwd, (logits, target, *options))
    _, stats = ns.cross_entropy_fwd(logits.detach(), target, *options)
    grad = torch.randn(6, device=device)
    torch.library.opcheck(ns.cross_entropy_bwd, (grad, logits.detach(), target, stats, *options))
    torch.library.opcheck(ns.cross_entropy_bwd_, (grad, logits.detach().clone(), target, stats, *options))
    if backend != "triton":  # the fused op of the chunked losses (softcap on)
        torch.library.opcheck(ns.cross_entropy_fwd_bwd_,
                              (logits.detach().clone(), target, grad, -100, 0.0, 0.0, 5.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    device = device_for(backend)
    h = torch.randn(10, 16, device=device)
    w = torch.randn(45, 16, device=device)
    target = torch.randint(0, 45, (10,), device=device)
    target[2] = -100

    def step(h_, w_):
        return cross_entropy(h_ @ w_.t(), target, label_smoothing=0.1, z_loss=1e-3, backend=backend) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = value_and_grads(compiled, h, w)
    expected = value_and_grads(step, h, w)
    torch.testing.assert_close(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def test_target_out_of_range(self, backend):
        with pytest.raises(ValueError, match=r"target\[1\] = 10 is out of range \[0, 10\)"):
            cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, 2]), backend=backend)

    def test_negative_target_that_is_not_ignore_index(self, backend):
        with pytest.raises(ValueError, match=r"target\[0\] = -1 is out of range"):
            cross_entropy(torch.randn(3, 10), torch.tensor([-1, 0, 2]), backend=backend)

    def test_target_shape(self, backend):
        with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
            cross_entropy(torch.randn(3, 10), torch.tensor([1, 2]), backend=backend)

    def test_float_target(self, backend):
        with pytest.raises(ValueError, match="target must hold class indices"):
            cross_entropy(torch.randn(3, 10), torch.rand(3), backend=backend)

    def test_bad_reduction(self, backend):
        with pytest.raises(ValueError, match="reduction must be one of"):
            cross_entropy(torch.randn(3, 10), torch.tensor([1, 2, 3]), reduction="avg", backend=backend)

    def test_label_smoothing_range(self, backend):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            cross_entropy(torch.randn(3, 10), torch.tensor([1, 2, 3]), label_smoothing=1.5, backend=backend)

    def test_num_items_needs_mean(self, backend):
        with pytest.raises(ValueError, match="num_items is the denominator"):
            cross_entropy(torch.randn(3, 10), torch.tensor([1, 2, 3]), reduction="sum", num_items=3,
                          backend=backend)

    def test_integer_logits(self, backend):
        with pytest.raises(ValueError, match="logits must have a floating dtype"):
            cross_entropy(torch.ones(3, 10, dtype=torch.int32), torch.tensor([1, 2, 3]), backend=backend)


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
class TestRawOpChecks:
    def test_target_out_of_range(self):
        with pytest.raises(RuntimeError, match=r"cross_entropy_fwd: target\[2\] = 7 is out of range"):
            torch.ops.slmfast.cross_entropy_fwd(torch.randn(3, 7), torch.tensor([0, 1, 7]), -100, 0.0, 0.0,
                                                0.0)

    def test_target_dtype(self):
        with pytest.raises(RuntimeError, match="cross_entropy_fwd: target must have dtype Long"):
            torch.ops.slmfast.cross_entropy_fwd(torch.randn(3, 7), torch.tensor([0, 1, 2], dtype=torch.int32),
                                                -100, 0.0, 0.0, 0.0)

    def test_stats_shape(self):
        with pytest.raises(RuntimeError, match=r"cross_entropy_bwd: stats must be the contiguous \(3, 2\)"):
            torch.ops.slmfast.cross_entropy_bwd(torch.ones(3), torch.randn(3, 7), torch.tensor([0, 1, 2]),
                                                torch.zeros(3), -100, 0.0, 0.0, 0.0)

    def test_distill_kind(self):
        with pytest.raises(RuntimeError, match="distill_fwd: kind must be 0"):
            torch.ops.slmfast.distill_fwd(torch.randn(3, 7), torch.randn(3, 7), None, 9, 0.5, 1.0, 0.0, -100)
