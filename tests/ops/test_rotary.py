"""rotary on every available backend against the float64 reference and Hugging Face's
apply_rotary_pos_emb: dense and packed layouts, half-split and interleaved pairs, partial rotary,
in place, strided inputs."""

import pytest
import torch

from slmfast import backends
from slmfast.functional import rotary
from slmfast.ops.rotary import IMPLEMENTED, rotary_reference
from tests.helpers import assert_close, backend_params, cpu_capability_params, device_for, saved_tensor_bytes

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params(IMPLEMENTED)
KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "torch"]
# The torch backend IS rotary_reference: the dense comparison runs the kernels only, and
# test_matches_hf_apply_rotary_pos_emb checks every backend, torch included, against transformers.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
# (B, Hq, Hkv, T, D, R): GQA, one token of a 4096-wide head, partial rotary (NeoX/Phi style)
CONFIGS = [(3, 4, 1, 17, 80, 80), (1, 1, 1, 1, 4096, 4096), (2, 3, 3, 5, 40, 16), (2, 2, 1, 9, 96, 64)]


def _angles(positions, rot, dtype=torch.float32, base=10000.0):
    """cos/sin in HF's layout cat(freqs, freqs) for integer positions of any shape."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64, device=positions.device) / rot)
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _run(fn, q, k, grad_q, grad_k):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    q_rot, k_rot = fn(*leaves)
    loss = (q_rot.double() * grad_q).sum() + (k_rot.double() * grad_k).sum()
    return (q_rot, k_rot), torch.autograd.grad(loss, leaves)


def _compare(backend, q, k, cos, sin, interleaved):
    grad_q = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    grad_k = torch.randn(k.shape, dtype=torch.float64, device=k.device)
    def ours(a, b):
        return rotary(a, b, cos, sin, interleaved, backend=backend)

    def same_dtype(a, b):
        return rotary_reference(a, b, cos, sin, interleaved)

    def fp64(a, b):
        return rotary_reference(a.double(), b.double(), cos.double(), sin.double(), interleaved)

    outs, grads = _run(ours, q, k, grad_q, grad_k)
    base_outs, base_grads = _run(same_dtype, q, k, grad_q, grad_k)
    ref_outs, ref_grads = _run(fp64, q, k, grad_q, grad_k)
    for name, a, b, r in zip(("q_rot", "k_rot", "dq", "dk"), (*outs, *grads), (*base_outs, *base_grads),
                             (*ref_outs, *ref_grads)):
        assert a.dtype == q.dtype, name
        assert_close(name, a, b, r)
    return outs


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_dense_matches_fp64_reference(backend, config, dtype, interleaved):
    batch, hq, hkv, seqlen, head_dim, rot = config
    device = device_for(backend)
    q = torch.randn(batch, hq, seqlen, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, hkv, seqlen, head_dim, dtype=dtype, device=device)
    cos, sin = _angles(torch.arange(seqlen, device=device) + 3, rot)
    _compare(backend, q, k, cos, sin, interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_per_batch_positions_and_strided_inputs(backend, interleaved):
    """cos (B, T, R) with different positions per row; q, k the (B, T, H, D) -> (B, H, T, D)
    transposes of projection outputs (no copy), outputs laid out the same way."""
    device = device_for(backend)
    batch, seqlen, head_dim = 2, 7, 32
    q = torch.randn(batch, seqlen, 4, head_dim, device=device).transpose(1, 2)  # (B, H, T, D) strided
    k = torch.randn(batch, seqlen, 2, head_dim, device=device).transpose(1, 2)
    positions = torch.stack([torch.arange(seqlen), torch.arange(seqlen) * 2 + 5]).to(device)  # (B, T)
    cos, sin = _angles(positions, head_dim)
    q_rot, k_rot = _compare(backend, q, k, cos, sin, interleaved)
    if backend != "torch":  # the kernels keep the inputs' layout; the reference returns contiguous
        assert q_rot.stride() == q.stride() and k_rot.stride() == k.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_layout_with_positions_restarting_per_document(backend, dtype):
    device = device_for(backend)
    lengths = [5, 1, 9]
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)  # (N,)
    n = positions.numel()
    q = torch.randn(n, 4, 48, dtype=dtype, device=device)
    k = torch.randn(n, 2, 48, dtype=dtype, device=device)
    cos, sin = _angles(positions, 48)
    q_rot, k_rot = _compare(backend, q, k, cos, sin, False)
    # token t of a document is rotated as token t of that document alone, in the dense layout
    start = lengths[0] + lengths[1]
    doc_q = q[start:].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
    doc_k = k[start:].transpose(0, 1).unsqueeze(0)
    alone, _ = rotary_reference(doc_q, doc_k, *_angles(torch.arange(lengths[2], device=device), 48))
    torch.testing.assert_close(q_rot[start:], alone.squeeze(0).transpose(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hf_apply_rotary_pos_emb(backend):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    device = device_for(backend)
    q = torch.randn(2, 4, 11, 64, dtype=torch.float64 if backend in ("torch", "cpu") else torch.float32,
                    device=device)
    k = torch.randn(2, 2, 11, 64, dtype=q.dtype, device=device)
    cos, sin = _angles(torch.arange(11, device=device)[None].expand(2, 11), 64, q.dtype)  # (B, T, D)
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_rot, k_rot = rotary(q, k, cos, sin, backend=backend)
    tol = 1e-12 if q.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(q_rot, hf_q, rtol=0, atol=tol)
    torch.testing.assert_close(k_rot, hf_k, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_inplace(backend, layout):
    """inplace=True writes into q and k (and returns them) and gives the out-of-place result and
    gradients, also when q and k come out of a projection."""
    device = device_for(backend)
    x = torch.randn(2, 6, 32, device=device, requires_grad=True)
    proj = torch.randn(32, 3 * 16 * 2, device=device, requires_grad=True)
    cos, sin = _angles(torch.arange(6, device=device), 10)  # partial: 10 of 16 features

    def heads(inplace):
        qk = (x @ proj)  # (B, T, 3 * 2 * 16)
        q, k = qk[..., :64], qk[..., 64:]  # strided views
        if layout == "dense":
            q = q.reshape(2, 6, 4, 16).transpose(1, 2)  # (B, H, T, D)
            k = k.reshape(2, 6, 2, 16).transpose(1, 2)
            c, s = cos, sin
        else:
            q, k = q.reshape(12, 4, 16), k.reshape(12, 2, 16)  # (N, H, D)
            c, s = cos.repeat(2, 1), sin.repeat(2, 1)
        q_rot, k_rot = rotary(q, k, c, s, inplace=inplace, backend=backend)
        if inplace:
            assert q_rot is q and k_rot is k
        return q_rot, k_rot

    ref = heads(False)
    grads_ref = torch.autograd.grad((ref[0] ** 2).sum() + ref[1].sum(), (x, proj))
    got = heads(True)
    grads = torch.autograd.grad((got[0] ** 2).sum() + got[1].sum(), (x, proj))
    for a, b in zip((*got, *grads), (*ref, *grads_ref)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_without_grad(backend):
    device = device_for(backend)
    q, k = torch.randn(1, 2, 5, 8, device=device), torch.randn(1, 1, 5, 8, device=device)
    cos, sin = _angles(torch.arange(5, device=device), 8)
    expected = rotary_reference(q, k, cos, sin)
    q_rot, k_rot = rotary(q, k, cos, sin, inplace=True, backend=backend)
    assert q_rot is q and k_rot is k
    torch.testing.assert_close(q, expected[0])
    torch.testing.assert_close(k, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cos_in_the_activation_dtype(backend):
    device = device_for(backend)
    q = torch.randn(2, 2, 5, 16, dtype=torch.bfloat16, device=device)
    k = torch.randn(2, 1, 5, 16, dtype=torch.bfloat16, device=device)
    cos, sin = _angles(torch.arange(5, device=device), 16, torch.bfloat16)
    _compare(backend, q, k, cos, sin, False)


@CPU
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(interleaved, layout, capability):
    if layout == "dense":
        q = torch.randn(2, 3, 4, 10, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 1, 4, 10, dtype=torch.float64, requires_grad=True)
        cos, sin = _angles(torch.arange(4), 6, torch.float64)
    else:
        q = torch.randn(5, 3, 10, dtype=torch.float64, requires_grad=True)
        k = torch.randn(5, 1, 10, dtype=torch.float64, requires_grad=True)
        cos, sin = _angles(torch.tensor([0, 1, 2, 0, 1]), 6, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rotary(a, b, cos, sin, interleaved, backend="cpu"), (q, k))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_saved_bytes_are_cos_and_sin(backend):
    device = device_for(backend)
    q = torch.randn(2, 4, 16, 32, dtype=torch.bfloat16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 16, 32, dtype=torch.bfloat16, device=device, requires_grad=True)
    cos, sin = _angles(torch.arange(16, device=device), 32)
    saved, _ = saved_tensor_bytes(rotary, q, k, cos, sin, backend=backend)
    assert saved == 2 * 16 * 32 * 4  # cos and sin (fp32); nothing per head


# ---- registration: opcheck and torch.compile ----------------------------------------------

def _ns(backend):
    return torch.ops.slmfast_triton if backend == "triton" else torch.ops.slmfast


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    q = torch.randn(2, 3, 5, 16, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(2, 1, 5, 16, device=device)
    cos, sin = _angles(torch.arange(5, device=device), 12)
    cos, sin = cos[None], sin[None]
    ns = _ns(backend)
    torch.library.opcheck(ns.rotary, (q.requires_grad_(), k.requires_grad_(), cos, sin, True, False))
    torch.library.opcheck(ns.rotary_, (q.detach().clone(), k.detach().clone(), cos, sin, False, False))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_compiles_fullgraph(backend, inplace):
    device = device_for(backend)
    x = torch.randn(2, 5, 24, device=device)
    proj = torch.randn(24, 4 * 16, device=device)
    cos, sin = _angles(torch.arange(5, device=device), 16)

    def block(x_, proj_):
        qk = x_ @ proj_  # (B, T, (3 + 1) * 16)
        q = qk[..., :48].reshape(2, 5, 3, 16).transpose(1, 2)  # (B, H, T, D) views
        k = qk[..., 48:].reshape(2, 5, 1, 16).transpose(1, 2)
        q_rot, k_rot = rotary(q, k, cos, sin, inplace=inplace, backend=backend)
        return (q_rot * 2).sum() + (k_rot ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, proj)]
    compiled(*leaves).backward()
    eager_leaves = [t.clone().requires_grad_() for t in (x, proj)]
    block(*eager_leaves).backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def _args(self):
        cos, sin = _angles(torch.arange(5), 8)
        return torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), cos, sin

    def test_integer_q(self, backend):
        q, k, cos, sin = self._args()
        with pytest.raises(ValueError, match="rotary: q must have a floating dtype"):
            rotary(q.int(), k, cos, sin, backend=backend)

    def test_k_of_another_head_dim(self, backend):
        q, _, cos, sin = self._args()
        with pytest.raises(ValueError, match=r"rotary: k must be \(B, Hkv, T, D\)"):
            rotary(q, torch.randn(1, 1, 5, 6), cos, sin, backend=backend)

    def test_cos_of_another_length(self, backend):
        q, k, _, _ = self._args()
        cos, sin = _angles(torch.arange(4), 8)
        with pytest.raises(ValueError, match=r"cos must be \(T, R\), \(1, T, R\) or \(B, T, R\) with T=5"):
            rotary(q, k, cos, sin, backend=backend)

    def test_odd_rotary_dim(self, backend):
        q, k, _, _ = self._args()
        with pytest.raises(ValueError, match="rotary: cos must have an even number of columns"):
            rotary(q, k, torch.randn(5, 7), torch.randn(5, 7), backend=backend)

    def test_sin_shape(self, backend):
        q, k, cos, _ = self._args()
        with pytest.raises(ValueError, match=r"rotary: sin must have shape \(5, 8\)"):
            rotary(q, k, cos, torch.randn(5, 6), backend=backend)

    def test_dtype_mix(self, backend):
        q, k, cos, sin = self._args()
        with pytest.raises(ValueError, match="rotary: k must have the dtype of q"):
            rotary(q, k.double(), cos, sin, backend=backend)

    def test_cos_dtype(self, backend):
        q, k, cos, sin = self._args()
        with pytest.raises(ValueError, match="rotary: cos must be float32 or have the dtype of q"):
            rotary(q, k, cos.half(), sin.half(), backend=backend)

    def test_packed_cos_rows(self, backend):
        with pytest.raises(ValueError, match=r"rotary: cos must be \(N, R\) with N=6"):
            rotary(torch.randn(6, 2, 8), torch.randn(6, 1, 8), *_angles(torch.arange(5), 8), backend=backend)

    def test_cos_requiring_grad(self, backend):
        q, k, cos, sin = self._args()
        with pytest.raises(ValueError, match="rotary: cos and sin must not require grad"):
            rotary(q, k, cos.requires_grad_(), sin, backend=backend)

    def test_device_mix(self, backend):
        q, k, cos, sin = self._args()
        with pytest.raises(ValueError, match="cos is on meta but q is on cpu"):
            rotary(q, k, cos.to("meta"), sin, backend=backend)


@CPU
class TestRawOpChecks:
    def test_last_dim_not_contiguous(self):
        q = torch.randn(1, 2, 8, 5).transpose(2, 3)
        with pytest.raises(RuntimeError, match="rotary: q must have a contiguous last dimension"):
            torch.ops.slmfast.rotary(q, torch.randn(1, 1, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8),
                                     False, False)

    def test_rotary_dim_too_large(self):
        with pytest.raises(RuntimeError, match="rotary: cos must have an even number of columns"):
            torch.ops.slmfast.rotary(torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 5, 10),
                                     torch.randn(1, 5, 10), False, False)

    def test_inplace_same_tensor(self):
        q = torch.randn(1, 2, 5, 8)
        with pytest.raises(RuntimeError, match="rotary_: q and k must be different tensors"):
            torch.ops.slmfast.rotary_(q, q, torch.randn(1, 5, 8), torch.randn(1, 5, 8), False, False)
