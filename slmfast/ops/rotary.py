"""rotary: rotary position embedding of q and k — contract, reference, autograd, dispatch.

Math (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"): each pair
(x1, x2) of features of a head rotates by the angle theta_i of its token's position,
    x1' = x1 cos(theta_i) - x2 sin(theta_i),   x2' = x2 cos(theta_i) + x1 sin(theta_i)
with pairs (i, i + R/2) ("half-split": Hugging Face Llama/Mistral/Qwen, GPT-NeoX; what HF's
apply_rotary_pos_emb with rotate_half computes) or (2i, 2i + 1) (interleaved=True: GPT-J, the
original RoFormer). Only the first R = cos.shape[-1] <= D features rotate; the others pass through
unchanged (partial rotary: GPT-NeoX, Phi).

cos and sin are in the Hugging Face layout for both pairings: (..., R) with cos(theta_i) in
columns i and i + R/2 (cat(freqs, freqs), as slmfast.nn.RotaryEmbedding and HF's rotary
embeddings return them); the kernels read the first R/2 columns. They are constants: no gradient
flows into them (passing ones that require grad raises).

Layouts:
    dense   q (B, Hq, T, D), k (B, Hkv, T, D), cos/sin (T, R), (1, T, R) or (B, T, R) (what HF's
            rotary embeddings return for position_ids (1, T) or (B, T))
    packed  q (N, Hq, D), k (N, Hkv, D), cos/sin (N, R): one position per token, so sequences
            packed into one row (positions restarting per document) take their own angles.
q and k may be strided views (the (B, T, H, D) -> (B, H, T, D) transpose of a projection output
needs no copy) as long as the last dimension is contiguous. Outputs are laid out like q and k.
Dtypes: q and k float32, bfloat16, float16 or float64 (the same); cos/sin float32 or q's dtype.
Computed in float32 (float64 for fp64) and rounded once.

inplace=True rotates q and k in their own memory and returns them (allowed only when asked).

Saved for backward: cos and sin only (the angles; T x R, shared by every head). The rotation is
orthogonal, so the backward is the rotation by -theta of the incoming gradients. New bytes saved
per token: 0 (cos/sin are inputs the caller holds anyway).

Backends: cuda (csrc/cuda/rotary.cu), triton (slmfast/triton/rotary.py; float32/bf16/fp16),
cpu (csrc/cpu/rotary.cpp), torch (rotary_reference below).
"""

from __future__ import annotations

import torch

from slmfast import backends, gpu_table
from slmfast.ops import _checks

OP = "rotary"
IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def _rotate(x, cos, sin, interleaved: bool, conjugate: bool = False):
    """x (B, H, T, D), cos/sin (B or 1, T, R): the rotation in plain PyTorch."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rot = cos.shape[-1]
    half = rot // 2
    c = cos[..., :half].to(acc).unsqueeze(1)  # (B|1, 1, T, R/2)
    s = sin[..., :half].to(acc).unsqueeze(1)
    if conjugate:
        s = -s
    xr = x[..., :rot].to(acc)  # (B, H, T, R)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def _to_dense(q, k, cos, sin):
    """Both layouts as (B, H, T, D) views and (B|1, T, R) angles; `back` undoes the view."""
    if q.dim() == 3:  # packed (N, H, D): one batch row of N tokens
        def back(t):
            return t.squeeze(0).transpose(0, 1)
        q4, k4 = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0)  # (1, H, N, D)
        return q4, k4, cos.unsqueeze(0), sin.unsqueeze(0), back
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return q, k, cos, sin, (lambda t: t)


def rotary_reference(q, k, cos, sin, interleaved=False):
    """Plain PyTorch, the oracle of the tests when run in float64; both layouts."""
    q4, k4, c, s, back = _to_dense(q, k, cos, sin)
    return back(_rotate(q4, c, s, interleaved)), back(_rotate(k4, c, s, interleaved))


# ---- autograd wiring, shared by the C++ op (cpu/cuda) and the Triton op ---------------------

def _fake_forward(q, k, cos, sin, interleaved, conjugate):
    return torch.empty_like(q), torch.empty_like(k)


def _fake_inplace(q, k, cos, sin, interleaved, conjugate):
    return None


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, interleaved, conjugate = inputs
    ctx.interleaved = interleaved
    ctx.conjugate = conjugate
    ctx.save_for_backward(cos, sin)


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:  # empty tensors count as contiguous whatever their strides (the expanded
        # gradient of a sum has strides 0, which the kernels refuse): give them real ones
        return t if t.is_contiguous() and t.stride(-1) == 1 else torch.empty_like(
            t, memory_format=torch.contiguous_format)
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _make_backward(op):
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = op(_contiguous_last(dq), _contiguous_last(dk), cos, sin, ctx.interleaved, not ctx.conjugate)
        return dq, dk, None, None, None, None

    return backward


def _register(namespace: str, op, inplace_op) -> None:
    torch.library.register_fake(f"{namespace}::rotary")(_fake_forward)
    torch.library.register_fake(f"{namespace}::rotary_")(_fake_inplace)
    torch.library.register_autograd(f"{namespace}::rotary", _make_backward(op), setup_context=_setup_context)


if backends.extension() is not None:
    _register("slmfast", torch.ops.slmfast.rotary, torch.ops.slmfast.rotary_)

if backends.triton_version() is not None:
    from slmfast.triton import rotary as _triton_kernels

    @torch.library.custom_op("slmfast_triton::rotary", mutates_args=())
    def _triton_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       interleaved: bool, conjugate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.rotary(q, k, cos, sin, interleaved, conjugate)

    @torch.library.custom_op("slmfast_triton::rotary_", mutates_args=("q", "k"))
    def _triton_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        interleaved: bool, conjugate: bool) -> None:
        _triton_kernels.rotary_(q, k, cos, sin, interleaved, conjugate)

    _register("slmfast_triton", torch.ops.slmfast_triton.rotary, torch.ops.slmfast_triton.rotary_)


class _RotaryInplace(torch.autograd.Function):
    """In-place rotation of one tensor (q or k) with autograd: it is marked dirty, and the
    backward rotates the incoming gradient by -theta (out of place: it may be shared). One tensor
    per Function because autograd cannot rebase two in-place-modified views in one node."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, namespace):
        x4, _, cos, sin, _ = _to_dense(x, x, cos, sin)
        no_heads = x4.new_empty(x4.shape[0], 0, x4.shape[2], x4.shape[3])  # the op's k: nothing to rotate
        getattr(torch.ops, namespace).rotary_(x4, no_heads, cos, sin, interleaved, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.namespace, ctx.packed = interleaved, namespace, x.dim() == 3
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        dx4 = dx.transpose(0, 1).unsqueeze(0) if ctx.packed else dx
        dx4 = _contiguous_last(dx4)
        no_heads = dx4.new_empty(dx4.shape[0], 0, dx4.shape[2], dx4.shape[3])
        dx4, _ = getattr(torch.ops, ctx.namespace).rotary(dx4, no_heads, cos, sin, ctx.interleaved, True)
        return (dx4.squeeze(0).transpose(0, 1) if ctx.packed else dx4), None, None, None, None


# ---- the public op ------------------------------------------------------------------------

def _check(q, k, cos, sin, interleaved, inplace) -> torch.device:
    _checks.check_float(OP, "q", q)
    _checks.check_tensor(OP, "k", k)
    _checks.check_tensor(OP, "cos", cos)
    _checks.check_tensor(OP, "sin", sin)
    device = _checks.check_same_device(OP, q=q, k=k, cos=cos, sin=sin)
    _checks.check_same_dtype(OP, "k", k, "q", q)
    if q.dim() not in (3, 4):
        raise ValueError(f"{OP}: q must be (B, Hq, T, D) or packed (N, Hq, D), got shape {tuple(q.shape)}")
    if k.dim() != q.dim():
        raise ValueError(f"{OP}: k must have {q.dim()} dimensions like q {tuple(q.shape)}, got shape "
                         f"{tuple(k.shape)}")
    if q.dim() == 4:
        batch, _, seqlen, head_dim = q.shape
        if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seqlen, head_dim):
            raise ValueError(f"{OP}: k must be (B, Hkv, T, D) with B, T, D of q {tuple(q.shape)}, got shape "
                             f"{tuple(k.shape)}")
        bad_batch = cos.dim() == 3 and cos.shape[0] not in (1, batch)
        if cos.dim() not in (2, 3) or cos.shape[-2] != seqlen or bad_batch:
            raise ValueError(f"{OP}: cos must be (T, R), (1, T, R) or (B, T, R) with T={seqlen}, B={batch}, "
                             f"got shape {tuple(cos.shape)}")
    else:
        tokens, _, head_dim = q.shape
        if (k.shape[0], k.shape[2]) != (tokens, head_dim):
            raise ValueError(f"{OP}: k must be (N, Hkv, D) with N, D of q {tuple(q.shape)}, got shape "
                             f"{tuple(k.shape)}")
        if cos.dim() != 2 or cos.shape[0] != tokens:
            raise ValueError(f"{OP}: cos must be (N, R) with N={tokens} (one row per token of packed q), "
                             f"got shape {tuple(cos.shape)}")
    rot = cos.shape[-1]
    if rot == 0 or rot % 2 or rot > head_dim:
        raise ValueError(f"{OP}: cos must have an even number of columns R, 0 < R <= head dim {head_dim}, "
                         f"got shape {tuple(cos.shape)}")
    _checks.check_shape(OP, "sin", sin, tuple(cos.shape), "the shape of cos")
    if cos.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"{OP}: cos must be float32 or have the dtype of q ({q.dtype}), got {cos.dtype}")
    _checks.check_same_dtype(OP, "sin", sin, "cos", cos)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{OP}: cos and sin must not require grad (the rotation treats them as constants)")
    if not isinstance(interleaved, bool):
        raise ValueError(f"{OP}: interleaved must be a bool, got {interleaved!r}")
    if not isinstance(inplace, bool):
        raise ValueError(f"{OP}: inplace must be a bool, got {inplace!r}")
    return device


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
           inplace: bool = False, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot): RoPE applied to q and k; see the module docstring for layouts."""
    device = _check(q, k, cos, sin, interleaved, inplace)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    # On CUDA tensors the GPU dispatch table decides; where it says native: the "torch" backend.
    name = gpu_table.select(OP, IMPLEMENTED, device, backend, (("dtype", q.dtype), ("grad", grad)), False)
    if name == "triton" and q.dtype == torch.float64:
        name = backends.fallback(OP, name, "float64", IMPLEMENTED, device)
    if name == "torch":
        q_rot, k_rot = rotary_reference(q, k, cos, sin, interleaved)
        if inplace:
            return q.copy_(q_rot), k.copy_(k_rot)
        return q_rot, k_rot
    namespace = "slmfast_triton" if name == "triton" else "slmfast"
    ops = getattr(torch.ops, namespace)
    if inplace:
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError(f"{OP}: inplace=True needs q and k with a contiguous last dimension, got "
                             f"strides {q.stride()} and {k.stride()}")
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            if torch.compiler.is_compiling():
                # Traced graphs are functionalized anyway (in-place ops become out-of-place ones),
                # and AOTAutograd cannot trace an in-place autograd.Function on views: rotate out
                # of place and copy back, which has the same meaning.
                q4, k4, c, s, back = _to_dense(q, k, cos.contiguous(), sin.contiguous())
                q_rot, k_rot = ops.rotary(q4, k4, c, s, interleaved, False)
                return q.copy_(back(q_rot)), k.copy_(back(k_rot))
            cos, sin = cos.contiguous(), sin.contiguous()
            return (_RotaryInplace.apply(q, cos, sin, interleaved, namespace),
                    _RotaryInplace.apply(k, cos, sin, interleaved, namespace))
        q4, k4, c, s, _ = _to_dense(q, k, cos.contiguous(), sin.contiguous())
        ops.rotary_(q4, k4, c, s, interleaved, False)
        return q, k
    q4, k4, c, s, back = _to_dense(_contiguous_last(q), _contiguous_last(k), cos.contiguous(),
                                   sin.contiguous())
    q_rot, k_rot = ops.rotary(q4, k4, c, s, interleaved, False)
    return back(q_rot), back(k_rot)
