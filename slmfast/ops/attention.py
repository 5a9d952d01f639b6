"""attention: fused scaled-dot-product attention — contract, reference, autograd, dispatch.

Math (Vaswani et al. 2017; computed as FlashAttention-2, Dao 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning"), per batch row or document and per
query head h, which reads key/value head h // (Hq // Hkv) (GQA/MQA without repeating K/V):
    S = scale * q k^T                   scale defaults to 1 / sqrt(D)
    P = softmax(S + mask) over keys     in float32 (float64 for fp64)
    out = P v,  lse = logsumexp(S + mask) over keys (natural log, float32)
Mask, per document with T queries and S keys, offset = S - T (bottom-right aligned, as in
flash-attention and in SDPA's is_causal when T == S): key j is visible to query i iff
    (not causal or j <= i + offset)
    and (window_left < 0 or j >= i + offset - window_left)
    and (window_right < 0 or j <= i + offset + window_right)
`window=(left, right)`, either side -1 for unlimited. A query that sees no key (say causal with
T > S, or a window that leaves the sequence) gets out = 0, lse = -inf and zero gradients: never NaN.

Layouts:
    dense   q (B, Hq, T, D), k/v (B, Hkv, S, D) -> out (B, Hq, T, D), lse (B, Hq, T)
    packed  q (N, Hq, D), k/v (N, Hkv, D), cu_seqlens int32 (docs + 1,) from 0 to N,
            non-decreasing, max_seqlen >= the longest document -> out (N, Hq, D), lse (N, Hq).
            One cu_seqlens serves q and k (packed self-attention; the registered ops also take
            separate cu_seqlens_q/k). Documents never attend to each other; the kernels never
            visit another document's blocks (and skip every block a causal or window mask hides).
Dtypes float32, bfloat16, float16 (float32 accumulation, out in the input dtype); the cpu and
torch backends also take float64 (for gradcheck). Head dims: any on cpu and torch, 16..256 on
triton and cuda (others fall back). Inputs may be non-contiguous (the last dim is made contiguous).

Saved for backward: q, k, v, out and lse — nothing else; the backward recomputes P block by
block (delta = rowsum(dout * out), dS = P * (dP - delta)) and never holds a T x S tensor. In
bytes, for e bytes per element: e * D * (2 * B*Hq*T + 2 * B*Hkv*S) + 4 * B*Hq*T (+ cu_seqlens),
e.g. (B, H, T, D) = (4, 8, 1024, 64) in bf16: 4 x 4 MiB + 128 KiB = 16.1 MiB, where Hugging
Face's eager attention saves 204 MiB (measured with saved_tensors_hooks): q, k, v and the
(B, H, T, S) probabilities twice, in fp32 for the softmax and in bf16 for the product.
q, k, v are the projections' outputs and out is the op's own, so only lse is new memory.

lse is returned with `return_lse=True` as a non-differentiable output: gradients do not flow
through it (use it for logging, merging partial attentions, or distillation statistics).
`deterministic=True` asks for bit-identical gradients run to run; every backend here has only
deterministic backwards (no atomics: a dK/dV pass per key block and a separate dQ pass), so
False is accepted and changes nothing.

Backends: cuda (csrc/cuda/attention_*.cu through the C++ op), triton (slmfast/triton/attention.py),
cpu (csrc/cpu/attention.cpp: fp32, bf16 on AMX, fp16 through its fp32 kernel, fp64), torch
(attention_reference below). On CUDA tensors the automatic choice follows the GPU dispatch table
(slmfast/gpu_table.py), which may pick torch's own fused attention instead (attention_native:
SDPA, or varlen_attn for packed documents and windows).

scaled_dot_product_attention (at the end) has torch's signature and semantics and runs on this op
where it can (no mask or exactly the causal boolean mask, no dropout).
"""

from __future__ import annotations

import inspect
import math

import torch

from slmfast import backends, gpu_table
from slmfast.ops import _checks, _registry

OP = "attention"
SDPA_OP = "scaled_dot_product_attention"
GPU_HEAD_DIMS = (16, 256)  # head dims the triton and cuda kernels take
CUDA_BWD_MAX_HEAD_DIM = 128  # csrc/cuda/attention_bwd.cu


# ---- the reference --------------------------------------------------------------------------

def visible_mask(T: int, S: int, causal: bool, window_left: int = -1, window_right: int = -1,
                 device=None) -> torch.Tensor:
    """(T, S) boolean: which keys each query sees (bottom-right aligned, see the module doc)."""
    i = torch.arange(T, device=device).unsqueeze(1) + (S - T)  # (T, 1) the diagonal of row i
    j = torch.arange(S, device=device).unsqueeze(0)             # (1, S)
    vis = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        vis &= j <= i
    if window_left >= 0:
        vis &= j >= i - window_left
    if window_right >= 0:
        vis &= j <= i + window_right
    return vis


def _dense_reference(q, k, v, scale, causal, window_left, window_right):
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> out (B, Hq, T, D), lse (B, Hq, T) in the
    accumulation dtype. Products in the input dtype, softmax in float32 (float64 for fp64), as
    eager attention in transformers does."""
    heads_q, T, S = q.shape[1], q.shape[2], k.shape[2]
    group = heads_q // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, S, D)
        v = v.repeat_interleave(group, dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    vis = visible_mask(T, S, causal, window_left, window_right, q.device)  # (T, S)
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).to(acc)       # (B, Hq, T, S)
    scores = scores.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                  # (B, Hq, T), -inf if empty
    seen = vis.any(-1)                                                     # (T,)
    # exp(s - lse) is the softmax; rows that see nothing use 0 for lse, so exp(-inf) = 0, not NaN.
    probs = torch.exp(scores - torch.where(seen, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.matmul(probs.to(q.dtype), v)                               # (B, Hq, T, D)
    return out, lse


def attention_reference(q, k, v, *, causal=False, scale=None, window=None, cu_seqlens=None,
                        max_seqlen=None, return_lse=False, cu_seqlens_k=None):
    """Plain PyTorch, any dtype (the oracle of the tests when run in float64).

    Same arguments and layouts as `attention`; `cu_seqlens_k` (packed only) gives keys their own
    document offsets (default: cu_seqlens). lse comes in the accumulation dtype (float32, float64
    for fp64) so that a float64 run is a float64 oracle.
    """
    del max_seqlen  # the reference reads the lengths from cu_seqlens
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    left, right = (-1, -1) if window is None else window
    if cu_seqlens is None:
        out, lse = _dense_reference(q, k, v, scale, causal, left, right)
        return (out, lse) if return_lse else out
    cu_q = cu_seqlens.tolist()
    cu_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else cu_q
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qd = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, L, D)
        kd = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Lk, D)
        vd = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        o, lse = _dense_reference(qd, kd, vd, scale, causal, left, right)
        outs.append(o[0].transpose(0, 1))    # (L, Hq, D)
        lses.append(lse[0].transpose(0, 1))  # (L, Hq)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses) if lses else q.new_zeros(q.shape[:-1], dtype=acc)
    return (out, lse) if return_lse else out


# ---- torch's own fused attention: the "native" choice of the GPU dispatch table -------------

def _find_varlen():
    """(varlen_attn, its keyword names) when this torch has torch.nn.attention.varlen, else None.
    Its signature moved between releases (is_causal, or causal as window_size == (-1, 0); scale,
    window_size and enable_gqa added later): attention_native passes only what it accepts."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN = _find_varlen()  # looked up once: torch.compile need not trace inspect


def _varlen_native(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
    """varlen_attn (flash-attention 2 in torch) on packed q (N, Hq, D), k/v (N, Hkv, D), or None
    when this torch's varlen_attn cannot compute exactly this call."""
    if _VARLEN is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if q.shape[-1] % 8 != 0 or q.shape[-1] > 256:  # flash-attention's head dims
        return None
    varlen_attn, params = _VARLEN
    kwargs = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" not in params:
            return None
        kwargs["enable_gqa"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12 * scale:
        return None
    # Causal is the right window 0 (a key right of the diagonal is hidden); both are bottom-right
    # aligned in flash-attention, as here.
    right = 0 if causal else right
    if "window_size" in params:
        kwargs["window_size"] = (int(left), int(right))  # a tuple: (-1, 0) reads as is_causal
        if "is_causal" in params:
            kwargs["is_causal"] = causal
    elif left >= 0 or (right >= 0 and not causal):
        return None
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        return None
    return varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)


def attention_native(q, k, v, causal: bool, scale: float, left: int = -1, right: int = -1, cu_seqlens=None,
                     cu_seqlens_k=None, max_seqlen=None, max_seqlen_k=None):
    """This op computed by torch's own fused kernels, with the same semantics, or None where they
    cannot take the call (the caller then runs one of slmfast's backends):
      dense, no window     F.scaled_dot_product_attention (flash, cuDNN, efficient: SDPA picks);
                           causal only when T == S (SDPA aligns the causal mask top-left)
      packed, or a window  torch.nn.attention.varlen.varlen_attn on CUDA fp16/bf16 (a dense
                           window call is flattened to B documents of T rows); one set of offsets
                           for queries and keys
    Arguments as the registered op takes them (window sides, scale resolved). Returns out only:
    neither returns this op's lse layout, so return_lse calls never come here. Autocast is off
    inside: the op computes in its inputs' dtype, as its kernels do."""
    del max_seqlen_k  # only calls with one set of offsets come through: max_seqlen serves both
    with torch.autocast(q.device.type, enabled=False):
        return _attention_native(q, k, v, causal, scale, left, right, cu_seqlens, cu_seqlens_k, max_seqlen)


def _attention_native(q, k, v, causal, scale, left, right, cu_seqlens, cu_seqlens_k, max_seqlen):
    if cu_seqlens is None:
        batch, heads_q, t, d = q.shape
        s = k.shape[2]
        if left < 0 and right < 0:
            if causal and t != s:
                return None
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=heads_q != k.shape[1])
        if t != s or t == 0:
            return None
        cu = torch.arange(0, (batch + 1) * t, t, dtype=torch.int32, device=q.device)  # (B + 1,)
        flat = [x.transpose(1, 2).reshape(batch * t, x.shape[1], d) for x in (q, k, v)]  # (B*T, H, D)
        out = _varlen_native(*flat, cu, cu, t, t, causal, scale, left, right)
        return None if out is None else out.reshape(batch, t, heads_q, d).transpose(1, 2)  # (B, Hq, T, D)
    if cu_seqlens_k is not None:
        return None
    return _varlen_native(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal, scale, left, right)


# ---- autograd wiring, shared by the C++ op (cpu/cuda) and the Triton op ---------------------

def _fake_forward(q, k, v, scale, causal, window_left, window_right, cu_seqlens_q, cu_seqlens_k,
                  max_seqlen_q, max_seqlen_k):
    out = torch.empty_like(q)  # q's memory layout when dense (csrc/common/attention_args.h)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def _fake_backward(dout, q, k, v, out, lse, scale, causal, window_left, window_right, cu_seqlens_q,
                   cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic):
    return tuple(torch.empty_like(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, left, right, cu_q, cu_k, max_q, max_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (scale, causal, left, right, max_q, max_k)
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        scale, causal, left, right, max_q, max_k = ctx.args
        dout = _last_dim_contiguous(dout)
        dq, dk, dv = backward_op(dout, q, k, v, out, lse, scale, causal, left, right, cu_q, cu_k,
                                 max_q, max_k, True)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    return backward


_triton_kernels = None
if backends.triton_version() is not None:
    try:
        from slmfast.triton import attention as _triton_kernels
    except ImportError as exc:  # the Triton file is optional; any other import error is a bug
        if exc.name != "slmfast.triton.attention":
            raise

_triton_launchers = None
if _triton_kernels is not None:
    # The launchers take the scalars by keyword; the registered ops take every argument in
    # the order of the C++ schema, as the autograd formula above calls them.
    def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        causal: bool, window_left: int, window_right: int,
                        cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                        max_seqlen_q: int, max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.attention_fwd(
            q, k, v, scale=scale, causal=causal, window_left=window_left, window_right=window_right,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k)

    def _triton_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                         window_left: int, window_right: int, cu_seqlens_q: torch.Tensor | None,
                         cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_kernels.attention_bwd(
            dout, q, k, v, out, lse, scale=scale, causal=causal, window_left=window_left,
            window_right=window_right, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, deterministic=deterministic)

    _triton_launchers = (_triton_forward, _triton_backward)

_registry.register_forward_backward("attention", _fake_forward, _fake_backward, _setup_context,
                                    _make_backward, _triton_launchers)

IMPLEMENTED = ("cuda",) + (("triton",) if _triton_kernels is not None else ()) + ("cpu", "torch")


# ---- checks ---------------------------------------------------------------------------------

def _check_window(window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise ValueError(f"{OP}: window must be None or a pair of ints (left, right), got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"{OP}: window sides must be >= -1 (-1: unlimited), got {tuple(window)}")
    return left, right


def _check_cu_seqlens(cu_seqlens, rows: int, max_seqlen, names=("cu_seqlens", "max_seqlen", "q")) -> int:
    """Checks one packed tensor's document offsets (`rows` rows of tensor names[2]); returns its
    max_seqlen (computed when None)."""
    cu_name, max_name, rows_name = names
    _checks.check_tensor(OP, cu_name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{OP}: {cu_name} must have dtype int32, got "
                         f"{str(cu_seqlens.dtype).replace('torch.', '')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{OP}: {cu_name} must be a 1-D tensor of (documents + 1) offsets, got "
                         f"shape {tuple(cu_seqlens.shape)}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"{OP}: {max_name} must be None or an int >= 0, got {max_seqlen!r}")
    # Values: checked where that costs no device synchronization (CPU tensors), and never while
    # torch.compile traces (it would be data-dependent control flow); the C++ op checks again.
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            raise ValueError(f"{OP}: pass {max_name} with {cu_name} under torch.compile (computing it "
                             "would read the offsets: data-dependent)")
        return max_seqlen
    if cu_seqlens.device.type != "cpu":
        if max_seqlen is None:  # one device synchronization; pass max_seqlen to avoid it
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0
        return max_seqlen
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{OP}: {cu_name} must start at 0, got {offsets[0]}")
    if offsets[-1] != rows:
        raise ValueError(f"{OP}: {cu_name} must end at the number of rows of {rows_name} ({rows}), "
                         f"got {offsets[-1]}")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{OP}: {cu_name} must be non-decreasing, got {offsets}")
    longest = max(lengths, default=0)
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"{OP}: {max_name} ({max_seqlen}) is smaller than the longest document "
                         f"({longest} rows) in {cu_name}")
    return max_seqlen


def _check(q, k, v, cu_seqlens, max_seqlen, window, scale, cu_seqlens_k=None, max_seqlen_k=None):
    """Checks every argument; returns (device, window_left, window_right, max_seqlen, max_seqlen_k)."""
    _checks.check_float(OP, "q", q)
    _checks.check_tensor(OP, "k", k)
    _checks.check_tensor(OP, "v", v)
    _checks.check_same_dtype(OP, "k", k, "q", q)
    _checks.check_same_dtype(OP, "v", v, "q", q)
    device = _checks.check_same_device(OP, q=q, k=k, v=v, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k)
    packed = cu_seqlens is not None
    dims, layout = (3, "(N, H, D) (packed, with cu_seqlens)") if packed else (4, "(B, H, T, D)")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != dims:
            raise ValueError(f"{OP}: {name} must have shape {layout}, got {tuple(t.shape)}")
    _checks.check_shape(OP, "v", v, tuple(k.shape), "the shape of k")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{OP}: k must have the head dimension of q ({q.shape[-1]}), got "
                         f"{k.shape[-1]} (k shape {tuple(k.shape)})")
    if q.shape[-1] == 0:
        raise ValueError(f"{OP}: q must have a non-empty head dimension, got shape {tuple(q.shape)}")
    heads_q, heads_kv = q.shape[-2 if packed else 1], k.shape[-2 if packed else 1]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"{OP}: the number of query heads ({heads_q}) must be a multiple of the "
                         f"number of key/value heads ({heads_kv})")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"{OP}: k must have the batch size of q ({q.shape[0]}), got {k.shape[0]}")
    if not packed and (max_seqlen is not None or cu_seqlens_k is not None or max_seqlen_k is not None):
        raise ValueError(f"{OP}: max_seqlen, cu_seqlens_k and max_seqlen_k are only for the packed layout "
                         "(with cu_seqlens)")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{OP}: scale must be None or a number, got {type(scale).__name__}")
    left, right = _check_window(window)
    if packed:
        max_seqlen = _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
        if cu_seqlens_k is None:
            if max_seqlen_k is not None:
                raise ValueError(f"{OP}: max_seqlen_k needs cu_seqlens_k")
            if q.shape[0] != k.shape[0]:
                raise ValueError(f"{OP}: packed q and k must have the same number of rows (one cu_seqlens "
                                 f"for both; pass cu_seqlens_k otherwise), got {q.shape[0]} and {k.shape[0]}")
            max_seqlen_k = max_seqlen
        else:
            max_seqlen_k = _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k,
                                             ("cu_seqlens_k", "max_seqlen_k", "k"))
            if cu_seqlens_k.shape != cu_seqlens.shape:
                raise ValueError(f"{OP}: cu_seqlens_k must have one offset per document like cu_seqlens "
                                 f"({cu_seqlens.numel()}), got {cu_seqlens_k.numel()}")
    return device, left, right, max_seqlen, max_seqlen_k


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:  # empty tensors count as contiguous whatever their strides (the expanded
        # gradient of a sum has strides 0, which the kernels refuse): give them real ones
        return t if t.is_contiguous() and t.stride(-1) == 1 else torch.empty_like(
            t, memory_format=torch.contiguous_format)
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# ---- the public op ------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, window: tuple[int, int] | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
              return_lse: bool = False, deterministic: bool = True, backend: str | None = None,
              cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None):
    """Fused attention over dense (B, H, T, D) or packed (N, H, D) + cu_seqlens inputs.

    Returns out, or (out, lse) with `return_lse=True` (lse float32, not differentiable). See the
    module docstring for the mask, layouts and what is saved for backward. In the packed layout,
    `cu_seqlens_k` / `max_seqlen_k` give the keys their own document offsets (flash-attention's
    varlen form: queries and keys of a document may differ in number, e.g. unpadded decoding);
    by default keys use cu_seqlens.

    `deterministic`: the gradients are bit-identical from run to run on every backend, whatever
    it is set to: no backend has a faster non-deterministic backward (no atomics anywhere), so
    False is accepted for compatibility with flash-attention's signature and changes nothing.
    """
    del deterministic  # every backend's backward is deterministic (module docstring)
    device, left, right, max_seqlen, max_seqlen_k = _check(q, k, v, cu_seqlens, max_seqlen, window, scale,
                                                           cu_seqlens_k, max_seqlen_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    packed = cu_seqlens is not None
    layout = "window" if left >= 0 or right >= 0 else ("packed" if packed else "dense")
    kind = (("dtype", q.dtype), ("grad", needs_grad), ("head_dim", gpu_table.head_dim_bucket(q.shape[-1])),
            ("layout", layout), ("causal", bool(causal)))
    name = gpu_table.select(OP, IMPLEMENTED, device, backend, kind, True)
    if name == "native":
        out = None if return_lse else attention_native(q, k, v, bool(causal), scale, left, right, cu_seqlens,
                                                       cu_seqlens_k, max_seqlen, max_seqlen_k)
        if out is not None:
            return out
        name = gpu_table.fixed_order(OP, IMPLEMENTED, device)  # torch's own cannot take this call
    rejected: set[str] = set()
    while (why := _unsupported(name, q, needs_grad)) is not None:
        name = _fall_back(name, why, rejected, device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cu_k = (cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens) if packed else None
    seqlen_q, seqlen_k = (max_seqlen, max_seqlen_k) if packed else (0, 0)
    while True:
        if name == "torch":
            out, lse = attention_reference(q, k, v, causal=causal, scale=scale, window=(left, right),
                                           cu_seqlens=cu_seqlens, return_lse=True, cu_seqlens_k=cu_k)
            return (out, lse.float().detach()) if return_lse else out
        ops = torch.ops.slmfast_triton if name == "triton" else torch.ops.slmfast
        try:
            out, lse = ops.attention_fwd(q, k, v, scale, bool(causal), left, right, cu_seqlens, cu_k,
                                         seqlen_q, seqlen_k)
            return (out, lse) if return_lse else out
        except NotImplementedError as exc:
            # The CUDA kernels refuse what they cannot run (misaligned rows, a GPU without their
            # image; csrc/cuda/bindings.cpp): fall back, as for the static limits above. While
            # torch.compile traces, the fake implementation never raises, so this is eager-only.
            if name != "cuda":
                raise
            name = _fall_back(name, str(exc).splitlines()[0], rejected, device)
            while (why := _unsupported(name, q, needs_grad)) is not None:
                name = _fall_back(name, why, rejected, device)


def _fall_back(name: str, why: str, rejected: set[str], device: torch.device) -> str:
    """backends.fallback away from `name`, never back to a backend rejected before."""
    rejected.add(name)
    allowed = tuple(c for c in IMPLEMENTED if c not in rejected) + (name,)  # fallback() drops name
    return backends.fallback(OP, name, why, allowed, device)


def _unsupported(name: str, q: torch.Tensor, needs_grad: bool = False) -> str | None:
    """What the triton or cuda kernels cannot take in this call (checked before running), or None.
    The CUDA backward takes head dims up to CUDA_BWD_MAX_HEAD_DIM: a call that will need it goes
    elsewhere up front, since a backward cannot change backend once the forward ran."""
    if name not in ("triton", "cuda"):
        return None
    lo, hi = GPU_HEAD_DIMS
    head_dim = q.shape[-1]
    if q.dtype == torch.float64:
        return "float64"
    if not lo <= head_dim <= hi:
        return f"head dim {head_dim} (only {lo}..{hi})"
    if name == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        return f"{str(q.dtype).replace('torch.', '')} (its kernels take bfloat16 and float16)"
    if name == "cuda" and head_dim % 8 != 0:
        return f"head dim {head_dim} (its kernels need a multiple of 8)"
    if name == "cuda" and needs_grad and head_dim > CUDA_BWD_MAX_HEAD_DIM:
        return f"head dim {head_dim} with gradients (its backward takes up to {CUDA_BWD_MAX_HEAD_DIM})"
    return None


# ---- torch's scaled_dot_product_attention, on the fused op where it fits -------------------

def _causal_only(attn_mask: torch.Tensor, L: int, S: int) -> bool:
    """Whether a boolean attn_mask is exactly SDPA's is_causal mask (top-left tril(L, S))."""
    if attn_mask.dtype != torch.bool or attn_mask.dim() < 2 or tuple(attn_mask.shape[-2:]) != (L, S):
        return False
    tril = torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).tril()
    return bool(torch.equal(attn_mask, tril.expand_as(attn_mask)))


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """(None, window_right, causal) when the fused op computes this call, else (why not, ...)."""
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p}", 0, False
    tensors = (query, key, value)
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return "non-tensor inputs", 0, False
    if query.dtype not in _checks.FLOAT_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return "these dtypes", 0, False
    if key.device != query.device or value.device != query.device:
        return "inputs on different devices", 0, False
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        return "inputs of different ranks", 0, False
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "a value head dim different from the query's", 0, False
    if key.shape != value.shape or key.shape[:-3] != query.shape[:-3]:
        return "broadcast batch dimensions", 0, False
    if query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        if not enable_gqa or query.shape[-3] % key.shape[-3] != 0:
            return "different head counts without enable_gqa", 0, False
    L, S = query.shape[-2], key.shape[-2]
    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal", 0, False
        if torch.compiler.is_compiling() or not _causal_only(attn_mask, L, S):
            return "an attn_mask other than the causal one", 0, False
        is_causal = True
    if not is_causal:
        return None, -1, False
    # SDPA's causal mask is top-left aligned (j <= i); the fused one is bottom-right (j <= i + S - L).
    if L == S:
        return None, -1, True
    if L > S:
        return None, L - S, False  # j <= i + (S - L) + (L - S) = i, as a right window
    return "is_causal with fewer queries than keys (top-left alignment)", 0, False


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics, on the fused op
    where it can: no mask or a boolean mask that is exactly the causal one, no dropout. Anything
    else falls back to torch's with a one-time warning (an error under SLMFAST_STRICT=1)."""
    why, window_right, causal = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if why is not None:
        message = f"{SDPA_OP}: the fused op does not take {why}; using torch's"
        if backends.strict():
            raise ValueError(message + f" ({backends.ENV_STRICT}=1 forbids fallbacks)")
        if not torch.compiler.is_compiling():
            backends.warn_once(message)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa)
    lead, (L, E) = query.shape[:-2], query.shape[-2:]
    heads_q = query.shape[-3] if query.dim() >= 3 else 1
    heads_kv = key.shape[-3] if key.dim() >= 3 else 1
    S = key.shape[-2]
    batch = math.prod(query.shape[:-3])  # not reshape(-1, ...): ambiguous for an empty batch or L = 0
    q = query.reshape(batch, heads_q, L, E)  # (B, Hq, L, E)
    k = key.reshape(batch, heads_kv, S, E)   # (B, Hkv, S, E)
    v = value.reshape(batch, heads_kv, S, E)
    window = None if window_right < 0 else (-1, window_right)
    out = attention(q, k, v, causal=causal, scale=scale, window=window)
    return out.reshape(*lead, L, E)
