"""NaN and +/-Inf in the inputs of every op, on every backend (and every vector path of the cpu
backend): bad input is never hidden, and it never leaks into what does not depend on it.

For each op and each floating input, one element at a time (a random one and the last, which
sits in the vector tail of its row) is set to NaN, +Inf and -Inf, and the op's outputs and the
gradients of all its differentiable inputs are compared with eager float64 math written here from
torch's own functions (F.rms_norm, F.layer_norm, F.silu, F.gelu, F.cross_entropy, log_softmax,
softmax, matmul), independently of the ops' references. The rule, per output and gradient entry:

* lower bound, "not hidden": every entry that the eager math `eager_min` makes non-finite is
  non-finite. eager_min computes what depends on the bad element mathematically: a key that a
  query does not see, a row whose target is ignore_index, a cos/sin column the kernels do not
  read (the second half of the Hugging Face layout), never enter it.
* upper bound, "not leaked": an entry is non-finite only where the eager math `eager_max` makes
  it non-finite with NaN or with the value itself in that element. eager_max is the dense form
  of the same computation (full matmuls per document and head, gradients of zero-weighted terms
  multiplied through): a kernel that computes a zero-weighted product (0 * NaN = NaN inside a
  masked part of a block, or a GEMM over a chunk that holds an ignored row) may make those
  entries non-finite, and nothing beyond them (another row, document, head or batch entry).
  For the row-wise ops (norms, GLUs, rotary, the losses of logits) eager_max is eager_min: NaN
  reaches exactly what depends on it.
* everything finite on both sides is correct: the tolerance rule of tests/helpers.py, against
  eager_min in float64 with eager_min in the input dtype as the baseline.

Where eager torch is ill-defined, the contract decided here (and stated in eager_min):
* softmax-type reductions: a +Inf score or logit makes its row non-finite (torch's softmax gives
  NaN; the limit would be a one-hot, but that would hide an overflowed input); a -Inf score or
  logit is the mask value: that key or class gets probability exactly 0 and its terms count 0
  (0 log 0 = 0 in the KL divergences), so a -Inf teacher logit (a banned token) leaves the loss
  finite. An attention row whose every visible score is -Inf is a row that sees no key: out 0,
  lse -Inf, no gradient through it (the lse reveals it). Terms 0 * Inf that eager autograd makes
  NaN (the gradient through a probability that is exactly 0) are not required, only allowed.
* ignored rows (target == ignore_index) count for nothing, whatever their logits hold: loss 0
  and gradient exactly 0 (F.cross_entropy gives such a row a NaN gradient when its logits hold
  NaN; the contract of slmfast's losses is a zero gradient), except the 0 * NaN that a GEMM over
  the row's hidden state puts into the weight gradient (eager_max).

Then the edge cases: attention rows whose softmax has one visible key, T = S = 1, fully masked
rows (zeros, lse -inf, zero gradients, never NaN), and empty batches for every op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from slmfast import backends
from slmfast.functional import (
    attention,
    cross_entropy,
    distill_loss,
    distill_loss_from_logits,
    geglu,
    glu_linear,
    layer_norm,
    linear_cross_entropy,
    rms_norm,
    rms_norm_linear,
    rotary,
    scaled_dot_product_attention,
    swiglu,
    topk_distill_loss,
)
from slmfast.ops import attention as attention_op
from slmfast.ops import distill_loss as distill_op
from slmfast.ops import glu as glu_op
from slmfast.ops import layer_norm as layer_norm_op
from slmfast.ops import rms_norm as rms_norm_op
from tests.helpers import backend_params, device_for

INTERPRETED = backends.triton_interpreting() and not torch.cuda.is_available()
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
IGNORE = -100
MASKABLE = ("logits", "student", "teacher", "logprobs")  # inputs where -inf means "probability 0"
EPS = 1e-5


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the cases: inputs, the op, and its eager math ------------------------------------------

@dataclass
class Case:
    name: str
    implemented: tuple[str, ...]
    make: Callable          # (dtype, device, small) -> {name: tensor or int tensor}
    ours: Callable          # (backend, inputs) -> {output name: tensor}
    eager_min: Callable     # (inputs) -> {output name: tensor}, any dtype (see the module docstring)
    grads: tuple[str, ...]  # inputs that get gradients
    poison: tuple[str, ...]  # floating inputs that get a NaN / Inf in turn
    eager_max: Callable | None = None
    dtypes: tuple = (torch.float32, torch.bfloat16)
    triton_dtypes: tuple = (torch.float32, torch.float16)
    env_backend: bool = False  # the op has no backend= argument: choose it with SLMFAST_BACKEND
    ignored: dict = field(default_factory=dict)  # {input: row whose target is ignore_index}
    triton: bool = True  # also under the Triton interpreter


def _randn(*shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape) * scale + shift).to(dtype=dtype, device=device)


# norms -----------------------------------------------------------------------------------------

def _norm_inputs(kind, residual):
    def make(dtype, device, small):
        rows, hidden = (5, 72) if not small else (3, 40)
        d = {"x": _randn(rows, hidden, dtype=dtype, device=device, scale=2, shift=0.5),
             "weight": (torch.rand(hidden) + 0.5).to(dtype=dtype, device=device)}
        if kind == "layer":
            d["bias"] = _randn(hidden, dtype=dtype, device=device, scale=0.5)
        if residual:
            d["residual"] = _randn(rows, hidden, dtype=dtype, device=device)
        return d
    return make


def _rms_case(residual: bool) -> Case:
    offset = 1.0 if residual else 0.0

    def ours(backend, d):
        out = rms_norm(d["x"], d["weight"], EPS, d.get("residual"), offset, backend=backend)
        return {"y": out[0], "h": out[1]} if residual else {"y": out}

    def eager(d):
        x = d["x"]
        h = x + d["residual"] if residual else x
        acc = _acc(x.dtype)
        y = F.rms_norm(h.to(acc), (h.shape[-1],), d["weight"].to(acc) + offset, EPS).to(x.dtype)
        return {"y": y, "h": h} if residual else {"y": y}

    names = ("x", "weight") + (("residual",) if residual else ())
    return Case(f"rms_norm{'-residual' if residual else ''}", rms_norm_op.IMPLEMENTED,
                _norm_inputs("rms", residual), ours, eager, names, names)


def _layer_norm_case(residual: bool) -> Case:
    def ours(backend, d):
        out = layer_norm(d["x"], d["weight"], d["bias"], EPS, d.get("residual"), backend=backend)
        return {"y": out[0], "h": out[1]} if residual else {"y": out}

    def eager(d):
        x = d["x"]
        h = x + d["residual"] if residual else x
        acc = _acc(x.dtype)
        y = F.layer_norm(h.to(acc), (h.shape[-1],), d["weight"].to(acc), d["bias"].to(acc), EPS).to(x.dtype)
        return {"y": y, "h": h} if residual else {"y": y}

    names = ("x", "weight", "bias") + (("residual",) if residual else ())
    return Case(f"layer_norm{'-residual' if residual else ''}", layer_norm_op.IMPLEMENTED,
                _norm_inputs("layer", residual), ours, eager, names, names)


# gated linear units --------------------------------------------------------------------------

def _act(g, activation):
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


def _glu_case(activation: str) -> Case:
    def make(dtype, device, small):
        shape = (3, 5, 72) if not small else (2, 40)
        return {"gate": _randn(*shape, dtype=dtype, device=device, scale=2),
                "up": _randn(*shape, dtype=dtype, device=device)}

    def ours(backend, d):
        fn = swiglu if activation == "silu" else geglu
        return {"out": fn(d["gate"], d["up"], backend=backend)}

    def eager(d):
        acc = _acc(d["gate"].dtype)
        return {"out": (_act(d["gate"].to(acc), activation) * d["up"].to(acc)).to(d["gate"].dtype)}

    return Case("swiglu" if activation == "silu" else "geglu", glu_op.IMPLEMENTED, make, ours, eager,
                ("gate", "up"), ("gate", "up"))


# rotary --------------------------------------------------------------------------------------

def _rotary_case(interleaved: bool) -> Case:
    def make(dtype, device, small):
        B, Hq, Hkv, T, D, R = (2, 3, 1, 7, 40, 32) if not small else (1, 2, 1, 5, 16, 16)
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        freqs = pos * 10000.0 ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)  # (T, R/2)
        angles = torch.cat((freqs, freqs), -1)  # the Hugging Face layout
        return {"q": _randn(B, Hq, T, D, dtype=dtype, device=device),
                "k": _randn(B, Hkv, T, D, dtype=dtype, device=device),
                "cos": angles.cos().to(dtype=dtype, device=device),
                "sin": angles.sin().to(dtype=dtype, device=device)}

    def ours(backend, d):
        q, k = rotary(d["q"], d["k"], d["cos"], d["sin"], interleaved, backend=backend)
        return {"q_rot": q, "k_rot": k}

    def eager(d):
        # The kernels read cos/sin's first R/2 columns (the contract of slmfast/ops/rotary.py);
        # rotate_half (Hugging Face's form) or its interleaved twin on the full R columns.
        acc = _acc(d["q"].dtype)
        rot = d["cos"].shape[-1]
        half = rot // 2
        c, s = d["cos"][..., :half].to(acc), d["sin"][..., :half].to(acc)
        if interleaved:
            c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)

            def turn(x):
                return torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
        else:
            c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)

            def turn(x):
                return torch.cat((-x[..., half:], x[..., :half]), -1)

        def apply(x):
            xr = x[..., :rot].to(acc)
            return torch.cat(((xr * c + turn(xr) * s).to(x.dtype), x[..., rot:]), -1)

        return {"q_rot": apply(d["q"]), "k_rot": apply(d["k"])}

    return Case(f"rotary{'-interleaved' if interleaved else ''}", ("cuda", "triton", "cpu", "torch"), make,
                ours, eager, ("q", "k"), ("q", "k", "cos", "sin"))


# losses of logits ------------------------------------------------------------------------------

def _scatter_rows(rows_valid, valid):
    """(n_valid,) -> (n,) with zeros (no gradient path) on the other rows."""
    out = rows_valid.new_zeros(valid.shape)
    return out.index_put((valid.nonzero()[:, 0],), rows_valid)


def _reduce(rows, valid, reduction, dtype):
    if reduction == "none":
        return rows.to(dtype)
    count = int(valid.sum())
    return (rows.sum() / max(count, 1)).to(dtype)


def _ce_rows(z, y, label_smoothing, z_loss):
    """F.cross_entropy (+ z_loss * lse^2) per row, in z's dtype."""
    rows = F.cross_entropy(z, y, reduction="none", label_smoothing=label_smoothing)
    return rows + z_loss * torch.logsumexp(z, -1).pow(2) if z_loss else rows


def _ce_case(reduction: str, label_smoothing: float, z_loss: float) -> Case:
    def make(dtype, device, small):
        n, v = (9, 100) if not small else (5, 40)
        y = torch.randint(0, v, (n,))
        y[2] = IGNORE
        return {"logits": _randn(n, v, dtype=dtype, device=device, scale=2), "target": y.to(device)}

    def ours(backend, d):
        return {"loss": cross_entropy(d["logits"], d["target"], IGNORE, label_smoothing, reduction, z_loss,
                                      backend=backend)}

    def eager(d):
        z, y = d["logits"], d["target"].to(d["logits"].device)
        valid = y != IGNORE
        rows = _ce_rows(z[valid].to(_acc(z.dtype)), y[valid], label_smoothing, z_loss)
        return {"loss": _reduce(_scatter_rows(rows, valid), valid, reduction, z.dtype)}

    name = f"cross_entropy-{reduction}" + (f"-smooth{label_smoothing}-z{z_loss}" if label_smoothing else "")
    return Case(name, ("cuda", "triton", "cpu", "torch"), make, ours, eager, ("logits",), ("logits",),
                ignored={"logits": 2})


def _linear_ce_case(reduction: str, softcap: float | None) -> Case:
    def make(dtype, device, small):
        n, h, v = (19, 24, 70) if not small else (7, 16, 40)
        y = torch.randint(0, v, (n,))
        y[3] = IGNORE
        return {"hidden": _randn(n, h, dtype=dtype, device=device),
                "weight": _randn(v, h, dtype=dtype, device=device, scale=2 / h ** 0.5),
                "bias": _randn(v, dtype=dtype, device=device, scale=0.5),
                "target": y.to(device)}

    def ours(backend, d):
        return {"loss": linear_cross_entropy(d["hidden"], d["weight"], d["target"], d["bias"],
                                             ignore_index=IGNORE, reduction=reduction, softcap=softcap,
                                             chunk_size=8, backend=backend)}

    def rows_of(logits, y, valid, dtype):
        z = logits.to(_acc(dtype))
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        return _scatter_rows(_ce_rows(z, y[valid], 0.0, 0.0), valid)

    def eager(d):
        h, y = d["hidden"], d["target"].to(d["hidden"].device)
        valid = y != IGNORE
        logits = h[valid] @ d["weight"].t() + d["bias"]  # the valid rows only
        return {"loss": _reduce(rows_of(logits, y, valid, h.dtype), valid, reduction, h.dtype)}

    def eager_max(d):
        h, y = d["hidden"], d["target"].to(d["hidden"].device)
        valid = y != IGNORE
        logits = (h @ d["weight"].t() + d["bias"])[valid]  # GEMMs over every row
        return {"loss": _reduce(rows_of(logits, y, valid, h.dtype), valid, reduction, h.dtype)}

    return Case(f"linear_cross_entropy-{reduction}" + (f"-softcap{softcap}" if softcap else ""),
                ("cuda", "triton", "cpu", "torch"), make, ours, eager, ("hidden", "weight", "bias"),
                ("hidden", "weight", "bias"), eager_max=eager_max, ignored={"hidden": 3})


def _plogr(p, lp, lr):
    """sum_j p_j (log p_j - log r_j) over the last dim, with 0 log 0 = 0: terms where p is exactly
    0 count 0 and pass no gradient (NaN p is not 0: it propagates)."""
    zero = p == 0
    lp_safe = torch.where(zero, 0.0, lp)
    lr_safe = torch.where(zero, 0.0, lr)
    return torch.where(zero, 0.0, p * (lp_safe - lr_safe)).sum(-1)


def _soft_loss(lq, lp, kind, beta):
    """The distillation divergences of slmfast/ops/_loss_math.py from log Q and log P."""
    q, p = lq.exp(), lp.exp()
    if kind == "forward_kl":
        return _plogr(p, lp, lq)
    if kind == "reverse_kl":
        return _plogr(q, lq, lp)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        lm = torch.log(torch.where(m == 0, 1.0, m))  # only read where p or q (so m) is not 0
        return beta * _plogr(p, lp, lm) + (1 - beta) * _plogr(q, lq, lm)
    return 0.5 * (p - q).abs().sum(-1)


def _distill_rows(s, t, y, valid, kind, beta, temperature, hard_weight):
    """Per-row loss of the valid rows of student logits s and teacher logits t (acc dtype)."""
    lq = F.log_softmax(s / temperature, -1)
    lp = F.log_softmax(t.detach() / temperature, -1)
    rows = temperature ** 2 * _soft_loss(lq, lp, kind, 0.3 if beta is None else beta)
    if hard_weight:
        rows = rows + hard_weight * F.cross_entropy(s, y[valid], reduction="none")
    return rows


DISTILL = {"forward_kl": (1.0, 0.0), "reverse_kl": (2.0, 0.5), "jsd": (1.0, 0.0), "tvd": (2.0, 0.5)}


def _distill_logits_case(kind: str) -> Case:
    temperature, hard_weight = DISTILL[kind]

    def make(dtype, device, small):
        n, v = (7, 90) if not small else (5, 40)
        y = torch.randint(0, v, (n,))
        y[1] = IGNORE
        return {"student": _randn(n, v, dtype=dtype, device=device, scale=2),
                "teacher": _randn(n, v, dtype=dtype, device=device, scale=2), "target": y.to(device)}

    def ours(backend, d):
        return {"loss": distill_loss_from_logits(d["student"], d["teacher"], d["target"], kind=kind, beta=0.3,
                                                 temperature=temperature, hard_weight=hard_weight,
                                                 ignore_index=IGNORE, reduction="none", backend=backend)}

    def eager(d):
        # in the logits' dtype, as the op's torch backend (F.log_softmax and F.cross_entropy on them)
        s, y = d["student"], d["target"].to(d["student"].device)
        valid = y != IGNORE
        rows = _distill_rows(s[valid], d["teacher"][valid], y, valid, kind, 0.3, temperature, hard_weight)
        return {"loss": _scatter_rows(rows, valid).to(s.dtype)}

    return Case(f"distill_from_logits-{kind}", distill_op.IMPLEMENTED, make, ours, eager, ("student",),
                ("student", "teacher"), ignored={"student": 1, "teacher": 1})


def _distill_hidden_case(kind: str) -> Case:
    temperature, hard_weight = DISTILL[kind]

    def make(dtype, device, small):
        n, hs, ht, v = (13, 16, 24, 70) if not small else (6, 16, 16, 40)
        y = torch.randint(0, v, (n,))
        y[4] = IGNORE
        return {"student_hidden": _randn(n, hs, dtype=dtype, device=device),
                "student_weight": _randn(v, hs, dtype=dtype, device=device, scale=2 / hs ** 0.5),
                "teacher_hidden": _randn(n, ht, dtype=dtype, device=device),
                "teacher_weight": _randn(v, ht, dtype=dtype, device=device, scale=2 / ht ** 0.5),
                "target": y.to(device)}

    def ours(backend, d):
        return {"loss": distill_loss(d["student_hidden"], d["student_weight"], d["teacher_hidden"],
                                     d["teacher_weight"], d["target"], kind=kind, beta=0.3,
                                     temperature=temperature, hard_weight=hard_weight, ignore_index=IGNORE,
                                     chunk_size=5, backend=backend)}

    def loss_of(d, dense):
        sh, y = d["student_hidden"], d["target"].to(d["student_hidden"].device)
        valid = y != IGNORE
        acc = _acc(sh.dtype)
        if dense:  # GEMMs over every row, then the valid rows
            s = (sh @ d["student_weight"].t())[valid]
            t = (d["teacher_hidden"] @ d["teacher_weight"].t())[valid]
        else:
            s = sh[valid] @ d["student_weight"].t()
            t = d["teacher_hidden"][valid] @ d["teacher_weight"].t()
        rows = _distill_rows(s.to(acc), t.to(acc), y, valid, kind, 0.3, temperature, hard_weight)
        return {"loss": _reduce(_scatter_rows(rows, valid), valid, "mean", sh.dtype)}

    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
    return Case(f"distill_loss-{kind}", distill_op.IMPLEMENTED, make, ours, lambda d: loss_of(d, False),
                names[:2], names, eager_max=lambda d: loss_of(d, True),
                ignored={"student_hidden": 4, "teacher_hidden": 4})


def _topk_case(kind: str) -> Case:
    def make(dtype, device, small):
        n, h, v, k = 9, 16, 50, 6
        logits = torch.randn(n, v) * 2
        top = torch.log_softmax(logits, -1).topk(k, -1)
        return {"student_hidden": _randn(n, h, dtype=dtype, device=device),
                "student_weight": _randn(v, h, dtype=dtype, device=device, scale=2 / h ** 0.5),
                "ids": top.indices.to(device), "logprobs": top.values.to(dtype=dtype, device=device)}

    def ours(backend, d):
        return {"loss": topk_distill_loss(d["student_hidden"], d["student_weight"], d["ids"], d["logprobs"],
                                          kind=kind, beta=0.3, tail="none", temperature=2.0, chunk_size=4,
                                          backend=backend)}

    def loss_of(d, dense):
        sh, ids = d["student_hidden"], d["ids"].to(d["student_hidden"].device)
        acc = _acc(sh.dtype)
        if dense:  # all V logits by GEMM, log_softmax over V, then the k ids (as a kernel does)
            s = (sh @ d["student_weight"].t()).to(acc)
            lq = F.log_softmax(F.log_softmax(s / 2.0, -1).gather(-1, ids), -1)
        else:  # tail="none" depends on the k ids' logits only: compute just those
            s_k = torch.einsum("nh,nkh->nk", sh, d["student_weight"][ids]).to(acc)
            lq = F.log_softmax(s_k / 2.0, -1)
        lp = F.log_softmax(d["logprobs"].to(acc) / 2.0, -1)
        return {"loss": (4.0 * _soft_loss(lq, lp, kind, 0.3)).mean().to(sh.dtype)}

    return Case(f"topk_distill-{kind}", distill_op.IMPLEMENTED_TOPK, make, ours, lambda d: loss_of(d, False),
                ("student_hidden", "student_weight"), ("student_hidden", "student_weight", "logprobs"),
                eager_max=lambda d: loss_of(d, True))


# fused layers ----------------------------------------------------------------------------------

def _norm_linear_case(residual: bool) -> Case:
    def make(dtype, device, small):
        rows, hidden, outs = (7, 40, (24, 8)) if not small else (3, 16, (8, 4))
        d = {"x": _randn(rows, hidden, dtype=dtype, device=device, scale=2),
             "norm_weight": (torch.rand(hidden) + 0.5).to(dtype=dtype, device=device),
             "w0": _randn(outs[0], hidden, dtype=dtype, device=device, scale=hidden ** -0.5),
             "w1": _randn(outs[1], hidden, dtype=dtype, device=device, scale=hidden ** -0.5),
             "b0": _randn(outs[0], dtype=dtype, device=device, scale=0.1)}
        if residual:
            d["residual"] = _randn(rows, hidden, dtype=dtype, device=device)
        return d

    def ours(backend, d):
        out = rms_norm_linear(d["x"], d["norm_weight"], [d["w0"], d["w1"]], [d["b0"], None], EPS,
                              d.get("residual"), 0.0, backend=backend)
        return dict(zip(("out0", "out1", "h"), out))

    def eager(d):
        x = d["x"]
        h = x + d["residual"] if residual else x
        acc = _acc(x.dtype)
        y = F.rms_norm(h.to(acc), (h.shape[-1],), d["norm_weight"].to(acc), EPS).to(x.dtype)
        out = {"out0": F.linear(y, d["w0"], d["b0"]), "out1": F.linear(y, d["w1"])}
        return {**out, "h": h} if residual else out

    names = ("x", "norm_weight", "w0", "w1", "b0") + (("residual",) if residual else ())
    return Case(f"rms_norm_linear{'-residual' if residual else ''}", rms_norm_op.IMPLEMENTED, make, ours,
                eager, names, names)


def _glu_linear_case(activation: str) -> Case:
    def make(dtype, device, small):
        rows, inner, out = (7, 40, 24) if not small else (3, 16, 8)
        return {"gate": _randn(rows, inner, dtype=dtype, device=device, scale=2),
                "up": _randn(rows, inner, dtype=dtype, device=device),
                "weight": _randn(out, inner, dtype=dtype, device=device, scale=inner ** -0.5),
                "bias": _randn(out, dtype=dtype, device=device, scale=0.1)}

    def ours(backend, d):
        return {"out": glu_linear(d["gate"], d["up"], d["weight"], d["bias"],
                                  "silu" if activation == "silu" else "gelu_tanh", backend=backend)}

    def eager(d):
        acc = _acc(d["gate"].dtype)
        a = (_act(d["gate"].to(acc), activation) * d["up"].to(acc)).to(d["gate"].dtype)
        return {"out": F.linear(a, d["weight"], d["bias"])}

    names = ("gate", "up", "weight", "bias")
    return Case(f"glu_linear-{activation}", glu_op.IMPLEMENTED, make, ours, eager, names, names)


# attention -------------------------------------------------------------------------------------

def _visible(T, S, causal, window, top_left=False):
    """(T, S): whether query i sees key j (bottom-right aligned as slmfast's attention, or top-left
    as SDPA's is_causal)."""
    i = torch.arange(T)[:, None] + (0 if top_left else S - T)
    j = torch.arange(S)[None, :]
    vis = torch.ones(T, S, dtype=torch.bool)
    left, right = window if window is not None else (-1, -1)
    if causal:
        vis &= j <= i
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return vis


def _documents(d):
    """(q, k, v, vis, write-back index) per document: q (Hq, L, D), k/v (Hkv, Lk, D)."""
    q, k, v = d["q"], d["k"], d["v"]
    causal, window, top_left = d["causal"], d["window"], d.get("top_left", False)
    docs = []
    if "cu" in d:
        cu = d["cu"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            docs.append((q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                         _visible(b - a, b - a, causal, window), ("packed", a, b)))
    else:
        for b in range(q.shape[0]):
            docs.append((q[b], k[b], v[b], _visible(q.shape[2], k.shape[2], causal, window, top_left),
                         ("dense", b, None)))
    return docs


def _assemble(d, pieces):
    """Per-document (out (Hq, L, D), lse (Hq, L)) back into the input layout."""
    if "cu" in d:
        outs = [o.transpose(0, 1) for o, _ in pieces]
        lses = [lse.transpose(0, 1) for _, lse in pieces]
        q = d["q"]
        out = torch.cat(outs) if outs else q.new_zeros(q.shape)
        lse = torch.cat(lses) if lses else q.new_zeros(q.shape[:-1], dtype=_acc(q.dtype))
        return out, lse
    return torch.stack([o for o, _ in pieces]), torch.stack([lse for _, lse in pieces])


def _attention_min(d):
    """Over the keys each query sees and whose score is not -inf (module docstring), with every
    operand of a pair that is left out masked to 0 before it is multiplied, so that nothing of a
    left-out pair reaches a gradient: (Hq, L, Lk, D) products per document, no matmul."""
    scale = d["scale"]
    pieces = []
    for q, k, v, vis, _ in _documents(d):
        group = q.shape[0] // k.shape[0]
        acc = _acc(q.dtype)
        kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (Hq, Lk, D)
        with torch.no_grad():
            s0 = (q @ kk.transpose(-1, -2)).to(acc) * scale
            keep = vis.to(q.device) & (s0 != float("-inf"))  # (Hq, L, Lk); NaN is kept
            empty = ~keep.any(-1, keepdim=True)  # sees no key: out 0, lse -inf, no gradient
        pair = keep[..., None]
        qe = torch.where(pair, q[:, :, None, :], 0).to(acc)  # (Hq, L, Lk, D)
        ke = torch.where(pair, kk[:, None, :, :], 0).to(acc)
        ve = torch.where(pair, vv[:, None, :, :], 0).to(acc)
        s = (qe * ke).sum(-1).to(q.dtype).to(acc) * scale  # rounded like a matmul in q's dtype
        s = torch.where(keep, s, float("-inf"))
        lse = torch.logsumexp(torch.where(empty, 0.0, s), -1, keepdim=True)  # +inf with a +inf score
        # exp(s - lse): with a +inf score, NaN for that key and 0 for the others
        p = torch.where(keep, torch.exp(torch.where(keep, s, 0.0) - lse), 0.0)
        out = (p.to(q.dtype).to(acc)[..., None] * ve).sum(-2).to(q.dtype)  # (Hq, L, D)
        pieces.append((out, torch.logsumexp(s, -1)))
    out, lse = _assemble(d, pieces)
    return {"out": out, "lse": lse.detach()}  # lse is not differentiable (slmfast/ops/attention.py)


def _attention_max(d):
    """Dense per document and head: every product of q and k and of p and v computed."""
    scale = d["scale"]
    pieces = []
    for q, k, v, vis, _ in _documents(d):
        group = q.shape[0] // k.shape[0]
        acc = _acc(q.dtype)
        kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        s = (q @ kk.transpose(-1, -2) * scale).to(acc)  # rounded as eager attention in q's dtype
        s = s.masked_fill(~vis.to(s.device), float("-inf"))
        empty = (s == float("-inf")).all(-1, keepdim=True)
        p = torch.exp(s - torch.where(empty, 0.0, torch.logsumexp(s, -1, keepdim=True)))
        pieces.append(((p.to(q.dtype) @ vv), torch.logsumexp(s, -1)))
    out, lse = _assemble(d, pieces)
    return {"out": out, "lse": lse.detach()}  # lse is not differentiable (slmfast/ops/attention.py)


# (B, Hq, Hkv, T, S, D, causal, window) dense, or ("packed", lengths, Hq, Hkv, D, causal, window)
ATTENTION_LAYOUTS = {
    "causal-gqa": (1, 4, 2, 40, 40, 40, True, None),
    "full-T!=S": (2, 2, 1, 9, 37, 64, False, None),
    "window": (1, 2, 2, 40, 40, 32, True, (6, -1)),
    "two-sided-window": (1, 2, 1, 24, 24, 16, False, (3, 2)),
    "causal-T>S": (1, 2, 1, 12, 5, 16, True, None),  # rows 0..6 see nothing
    "packed": ("packed", [1, 17, 0, 22], 4, 2, 32, True, None),
}
TRITON_ATTENTION = {
    "causal-gqa": (1, 2, 1, 17, 17, 16, True, None),
    "window": (1, 2, 2, 20, 20, 16, False, (3, 2)),
    "packed": ("packed", [1, 9, 0, 6], 2, 1, 16, True, None),
}


def _attention_case(name: str) -> Case:
    def make(dtype, device, small):
        layout = (TRITON_ATTENTION if small else ATTENTION_LAYOUTS)[name]
        if layout[0] == "packed":
            _, lengths, Hq, Hkv, D, causal, window = layout
            N = sum(lengths)
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            d = {"q": _randn(N, Hq, D, dtype=dtype, device=device),
                 "k": _randn(N, Hkv, D, dtype=dtype, device=device),
                 "v": _randn(N, Hkv, D, dtype=dtype, device=device), "cu": cu.to(device)}
        else:
            B, Hq, Hkv, T, S, D, causal, window = layout
            d = {"q": _randn(B, Hq, T, D, dtype=dtype, device=device),
                 "k": _randn(B, Hkv, S, D, dtype=dtype, device=device),
                 "v": _randn(B, Hkv, S, D, dtype=dtype, device=device)}
        return {**d, "causal": causal, "window": window, "scale": 1 / math.sqrt(D)}

    def ours(backend, d):
        packed = {"cu_seqlens": d["cu"]} if "cu" in d else {}
        out, lse = attention(d["q"], d["k"], d["v"], causal=d["causal"], window=d["window"], return_lse=True,
                             backend=backend, **packed)
        return {"out": out, "lse": lse}

    return Case(f"attention-{name}", attention_op.IMPLEMENTED, make, ours, _attention_min, ("q", "k", "v"),
                ("q", "k", "v"), eager_max=_attention_max,
                dtypes=(torch.float32, torch.bfloat16, torch.float16),
                triton=name in TRITON_ATTENTION)


def _sdpa_case(name: str) -> Case:
    # (B, Hq, Hkv, L, S, D, is_causal, mask)
    layout = {"causal-gqa": (2, 4, 2, 33, 33, 40, True, False),
              "causal-L>S": (1, 2, 2, 20, 12, 16, True, False),
              "bool-causal-mask": (1, 2, 2, 17, 17, 16, False, True)}[name]

    def make(dtype, device, small):
        B, Hq, Hkv, L, S, D, is_causal, mask = layout
        if small:  # the Triton interpreter
            B, L, S = 1, min(L, 12), min(S, 8 if L > S else 12)
        return {"q": _randn(B, Hq, L, D, dtype=dtype, device=device),
                "k": _randn(B, Hkv, S, D, dtype=dtype, device=device),
                "v": _randn(B, Hkv, S, D, dtype=dtype, device=device),
                "causal": is_causal or mask, "window": None, "top_left": True, "scale": 1 / math.sqrt(D)}

    def ours(backend, d):
        q, k, v = d["q"], d["k"], d["v"]
        L, S = q.shape[2], k.shape[2]
        kwargs = {"attn_mask": torch.ones(L, S, dtype=torch.bool, device=q.device).tril()} if layout[7] \
            else {"is_causal": layout[6]}
        return {"out": scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)}

    def strip(fn):
        return lambda d: {"out": fn(d)["out"]}

    return Case(f"sdpa-{name}", attention_op.IMPLEMENTED, make, ours, strip(_attention_min), ("q", "k", "v"),
                ("q", "k", "v"), eager_max=strip(_attention_max), env_backend=True)


CASES = {c.name: c for c in [
    _rms_case(False), _rms_case(True), _layer_norm_case(False), _layer_norm_case(True),
    _glu_case("silu"), _glu_case("gelu_tanh"), _rotary_case(False), _rotary_case(True),
    _ce_case("none", 0.0, 0.0), _ce_case("mean", 0.1, 1e-3),
    _linear_ce_case("mean", None), _linear_ce_case("none", 3.0),
    *[_distill_logits_case(kind) for kind in DISTILL], *[_distill_hidden_case(kind) for kind in DISTILL],
    _topk_case("forward_kl"), _topk_case("jsd"),
    _norm_linear_case(False), _norm_linear_case(True),
    _glu_linear_case("silu"), _glu_linear_case("gelu_tanh"),
    *[_attention_case(name) for name in ATTENTION_LAYOUTS],
    *[_sdpa_case(name) for name in ("causal-gqa", "causal-L>S", "bool-causal-mask")],
]}


def _params():
    """(case, backend, dtype, poisoned input) for every backend each case implements."""
    params = []
    for case in CASES.values():
        for backend in backend_params(case.implemented):
            name = backend.values[0]
            if name == "triton" and INTERPRETED and not case.triton:
                continue
            dtypes = case.triton_dtypes if name == "triton" and INTERPRETED else case.dtypes
            for dtype in dtypes:
                for poison in case.poison:
                    params.append(pytest.param(case.name, name, dtype, poison, marks=backend.marks,
                                               id=f"{case.name}-{backend.id}-{str(dtype)[6:]}-{poison}"))
    return params


# ---- running and comparing ---------------------------------------------------------------------

def _run(fn, inputs, grad_names, grad_outs):
    """fn's outputs and the gradients of sum(out . grad_out) w.r.t. grad_names (float64 products)."""
    leaves = {n: (t.detach().clone().requires_grad_(True) if n in grad_names else t)
              for n, t in inputs.items()}
    outs = fn(leaves)
    results = {n: o.detach() for n, o in outs.items()}
    diff = [(n, o) for n, o in outs.items() if o.requires_grad]
    if diff:
        total = sum((o.double() * grad_outs[n].to(o.device)).sum() for n, o in diff)
        wanted = [leaves[n] for n in grad_names]
        grads = torch.autograd.grad(total, wanted, allow_unused=True)
        for n, g in zip(grad_names, grads):
            results["d" + n] = g if g is not None else torch.zeros_like(leaves[n])
    return results


def _to(inputs, dtype=None, device="cpu"):
    """Floating tensors to dtype (when given) on device; the rest as they are (ints to device)."""
    out = {}
    for n, t in inputs.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().to(device)
            out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        else:
            out[n] = t
    return out


def _poisoned(inputs, name, flat, value):
    out = dict(inputs)
    t = inputs[name].detach().clone()
    t.view(-1)[flat] = value
    out[name] = t
    return out


def _where(mask):
    idx = mask.nonzero()
    return tuple(idx[0].tolist()) if len(idx) else ()


def _compare(label, name, ours, lower, upper, baseline, scale, clean_err, problems):
    """The three checks of the module docstring for one output or gradient."""
    ours = ours.detach().cpu().double()
    bad = ~torch.isfinite(ours)
    must = ~torch.isfinite(lower)
    hidden = must & ~bad
    leaked = bad & ~upper
    if hidden.any():
        at = _where(hidden)
        problems.append(f"{label}: {name}: {int(hidden.sum())} of {int(must.sum())} entries that eager math "
                        f"makes non-finite are finite here, first at {at}: {ours[at].item():.4g} "
                        f"(eager {lower[at].item()})")
    if name == "lse":  # -inf means "sees no key": never for a row whose inputs hold a NaN or inf
        empty = (ours == float("-inf")) & (lower != float("-inf"))
        if empty.any():
            at = _where(empty)
            problems.append(f"{label}: lse: {int(empty.sum())} rows get -inf (a row that sees no key) where "
                            f"eager math gives {lower[at].item()}, first at {at}")
    if leaked.any():
        at = _where(leaked)
        problems.append(f"{label}: {name}: {int(leaked.sum())} entries non-finite here that do not depend on "
                        f"the bad element, first at {at}: {ours[at].item()} (eager {lower[at].item():.4g})")
    both = ~bad & ~must
    if both.any():
        ref = lower[both]
        base = baseline.detach().cpu().double()[both]
        base = torch.where(torch.isfinite(base), base, ref)
        err = (ours[both] - ref).abs().max().item()
        # The tolerance rule of tests/helpers.py (assert_close), on a sample that may be small
        # (the entries the bad element leaves finite), so with both halves of the bound taken
        # from the whole clean output too. The error allowed is 2x the largest of: the baseline's
        # error here, its error on the clean input, and the op's own error on the clean input
        # (whose accuracy the op's test file checks): a bad element may not cost the entries it
        # leaves finite any accuracy. The floor is at the clean output's scale (the entries left
        # may all be ~0 by cancellation, e.g. dq of a row that sees one key).
        base_err = max((base - ref).abs().max().item(), clean_err)
        floor = 2.0 * torch.finfo(baseline.dtype).eps * max(scale, 1e-30)
        if err > 2.0 * base_err + floor:
            problems.append(f"{label}: {name}: finite entries: error {err:.3e} exceeds 2 x baseline error "
                            f"{base_err:.3e} + floor {floor:.3e} (dtype {baseline.dtype}, scale {scale:.3e})")


def _positions(t: torch.Tensor, ignored_row: int | None) -> list[int]:
    """A random element, the last one (in the vector tail of the last row) and, for an input
    with rows of a loss, one in a row whose target is ignore_index."""
    n = t.numel()
    flats = {int(torch.randint(n, ())), n - 1}
    if ignored_row is not None:
        cols = t.shape[-1]
        flats.add(ignored_row * cols + int(torch.randint(cols, ())))
    return sorted(flats)


@pytest.mark.parametrize("case_name,backend,dtype,poison", _params())
def test_nonfinite_input(case_name, backend, dtype, poison, monkeypatch):
    case = CASES[case_name]
    device = device_for(backend)
    small = backend == "triton" and INTERPRETED
    inputs = case.make(dtype, device, small)
    if case.env_backend:
        monkeypatch.setenv(backends.ENV_BACKEND, backend)
    eager_max = case.eager_max or case.eager_min
    # One upstream gradient per differentiable output, shared by every run.
    with torch.no_grad():
        shapes = case.eager_min(_to(inputs, torch.float64))
    grad_outs = {n: torch.randn(o.shape, dtype=torch.float64) for n, o in shapes.items()}
    clean = _run(case.eager_min, _to(inputs, torch.float64), case.grads, grad_outs)
    clean_base = _run(eager_max, _to(inputs), case.grads, grad_outs)
    clean_ours = _run(lambda d: case.ours(backend, d), inputs, case.grads, grad_outs)
    scales, clean_err = {}, {}
    for n, t in clean.items():
        a, b = clean_base[n].double(), clean_ours[n].detach().cpu().double()
        finite = torch.isfinite(t) & torch.isfinite(a) & torch.isfinite(b)
        scales[n] = t[finite].abs().max().item() if finite.any() else 0.0
        clean_err[n] = max((a - t)[finite].abs().max().item(), (b - t)[finite].abs().max().item()) \
            if finite.any() else 0.0
    problems: list[str] = []
    for flat in _positions(inputs[poison], case.ignored.get(poison)):
        # NaN spreads at least as far as +-inf through every eager function here (they test for
        # -inf and 0 explicitly, never for NaN): the upper bound of all three values.
        upper = _run(eager_max, _to(_poisoned(inputs, poison, flat, float("nan")), torch.float64),
                     case.grads, grad_outs)
        for label_value, value in VALUES.items():
            bad = _poisoned(inputs, poison, flat, value)
            where = tuple(torch.unravel_index(torch.tensor(flat), inputs[poison].shape))
            label = f"{poison}[{', '.join(str(int(i)) for i in where)}] = {label_value}"
            ours = _run(lambda d: case.ours(backend, d), bad, case.grads, grad_outs)
            lower = _run(case.eager_min, _to(bad, torch.float64), case.grads, grad_outs)
            # the baseline of the tolerance rule: the dense (torch-like) math in the input dtype
            baseline = _run(eager_max, _to(bad), case.grads, grad_outs)
            # In logits, -inf is the mask value (a banned token): it may make non-finite only what
            # the math makes non-finite with -inf itself, not all that NaN would.
            allowed = upper if (label_value, poison in MASKABLE) != ("-inf", True) else \
                _run(eager_max, _to(bad, torch.float64), case.grads, grad_outs)
            for name in lower:
                _compare(label, name, ours[name], lower[name], ~torch.isfinite(allowed[name]), baseline[name],
                         scales[name], clean_err[name], problems)
    assert not problems, "\n".join(problems[:12]) + (f"\n... {len(problems) - 12} more" if len(problems) > 12
                                                     else "")
