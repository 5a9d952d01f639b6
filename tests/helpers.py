"""Shared test helpers: the tolerance rule (docs/architecture.md §5), backend parametrization, the
attention oracle, and the saved-for-backward byte counter (slmfast.recompute.measure's)."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from slmfast import backends
from slmfast.ops.attention import visible_mask
from slmfast.recompute.measure import saved_tensor_bytes  # noqa: F401 (the tests' saved-bytes count)


def max_abs_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value.numel() == 0:
        return 0.0
    return (value.detach().double() - reference.detach().double()).abs().max().item()


def assert_close(name: str, ours: torch.Tensor, baseline, reference: torch.Tensor,
                 floor_ulps: float = 2.0, baseline_error: float = 0.0, terms: float = 0.0,
                 reduction: int = 1, compute_dtype: torch.dtype | None = None) -> None:
    """err(ours, fp64 reference) <= 2 * err(torch in the same dtype, reference) + a tiny floor.

    The floor is `floor_ulps` units of the dtype's epsilon at the reference's scale, so that
    exact results (baseline error 0) still allow the last-bit differences of another summation
    order, and nothing more.

    `baseline` is one tensor, or several: equally valid computations by torch in the same dtype
    (another summation order, another textbook formula for the same gradient), of which the
    largest error counts. `baseline_error` is an estimate of torch's error made elsewhere that
    counts when it is larger, e.g. mean_error_spread() for a scalar mean, whose own baseline
    error is a single random draw.

    `terms`, `reduction`: for an output computed with cancellation (a sum of `reduction` terms of
    both signs, such as a weight gradient summed over rows or a GEMM over the vocabulary, or a
    difference of nearly equal numbers, such as 1 - tanh(z)^2 near |tanh z| = 1), the largest
    sum of the absolute values of the terms of one output entry. Rounding errors are relative to
    those, not to the result: two correct summation orders differ by up to lambda sqrt(n) u
    sum |x_i| (u = eps / 2; with probability 1 - 2 exp(-lambda^2 / 2): Higham and Mary 2019, "A New
    Approach to Probabilistic Rounding Error Analysis"), so a gradient of 1.5e-3 made of terms of
    1e-2 may differ in ulps of 1e-2. The floor is then max(floor_ulps eps scale,
    floor_ulps eps sqrt(reduction) terms), lambda = 2 * floor_ulps.

    `compute_dtype`: the dtype the products ran in when it is coarser than the result's, as for
    the float32 gradients of a model under bf16 autocast: the floor counts its ulps.
    """
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    if torch.isfinite(reference).all():
        assert torch.isfinite(ours).all(), f"{name}: non-finite values where the reference is finite"
    err = max_abs_err(ours, reference)
    baselines = baseline if isinstance(baseline, (list, tuple)) else [baseline]
    base = max([max_abs_err(b, reference) for b in baselines] + [baseline_error])
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    eps = torch.finfo(compute_dtype or ours.dtype).eps
    floor = floor_ulps * eps * max(scale, terms * reduction ** 0.5, 1e-30)
    bound = 2.0 * base + floor
    assert err <= bound, (f"{name}: error {err:.3e} exceeds 2 x baseline error {base:.3e} + floor "
                          f"{floor:.3e} (dtype {ours.dtype}, scale {scale:.3e}"
                          + (f", terms {terms:.3e} x sqrt({reduction})" if terms else "") + ")")


def mean_error_spread(baseline_terms: torch.Tensor, reference_terms: torch.Tensor, z: float = 3.0) -> float:
    """The rounding error to expect of torch's mean of n terms, from torch's error on each term.

    A scalar that is the mean of n rounded terms carries a random error of standard deviation
    sigma / sqrt(n), sigma the spread of the per-term errors, so torch's own error on the scalar
    is one draw of it and may be arbitrarily close to 0 (a bf16 Llama loss: 1.6e-5 on one draw,
    against sigma / sqrt(n) = 1.1e-4 from its 64 per-token errors): two correct implementations
    differ from the oracle by a few sigma / sqrt(n) in either direction. This returns
    z * rms(per-term error) / sqrt(n), for assert_close(..., baseline_error=...). Terms that are
    not finite in the reference (ignored rows) are left out.
    """
    diff = (baseline_terms.detach().double() - reference_terms.detach().double()).flatten()
    diff = diff[torch.isfinite(reference_terms.detach().double().flatten())]
    if diff.numel() == 0:
        return 0.0
    return z * diff.pow(2).mean().sqrt().item() / diff.numel() ** 0.5


def glu_derivative_terms(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """Per element, the magnitude of the terms that act'(gate) is computed from (assert_close's
    `terms` for dgate = dout * up * act'(gate), times |dout * up|): silu' = s (1 + x (1 - s)) and
    gelu' = Phi + x phi carry a term ~|x| next to a result ~1; gelu_tanh' = (1 + t) / 2 +
    x (1 - t^2) z' / 2 with t = tanh z, z' = sqrt(2 / pi) (1 + 3 kappa x^2), where 1 - t^2 at
    |t| ~ 1 is a difference of two numbers ~1 times |x| z' (torch's own dgate is off by 8 ulps of
    the result at x ~ 5, float32)."""
    x = gate.detach().double().abs()
    if activation == "gelu_tanh":
        return 1 + x * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)
    return 1 + x


# ---- attention: the oracle ---------------------------------------------------------------------

def attention_oracle(q, k, v, *, causal=False, window=None, scale=None, cu_seqlens=None, cu_seqlens_k=None,
                     max_seqlen=None, max_seqlen_k=None):
    """(out, lse) of the attention contract (slmfast/ops/attention.py), written here apart from
    the op's own reference so that the `torch` backend is compared with something other than
    itself; the one attention oracle of the test suite.

    Dense q (B, Hq, T, D), k/v (B, Hkv, S, D), or packed q (Nq, Hq, D), k/v (Nk, Hkv, D) with
    cu_seqlens (and cu_seqlens_k; a tensor or a list). Scores in the dtype of the inputs, softmax
    and lse in float32 (float64 for float64 inputs), probabilities rounded to the inputs' dtype for
    the product with v. Run on float64 copies it is the oracle; run in the inputs' dtype it is the
    "torch in the same dtype" baseline of assert_close. A query that sees no key gets out 0,
    lse -inf and zero gradients."""
    del max_seqlen, max_seqlen_k
    left, right = (-1, -1) if window is None else window
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        return _attention_oracle_dense(q, k, v, causal, left, right, scale)
    starts_q = [int(x) for x in cu_seqlens]
    starts_k = starts_q if cu_seqlens_k is None else [int(x) for x in cu_seqlens_k]
    outs, lses = [], []
    for doc in range(len(starts_q) - 1):
        rows_q = slice(starts_q[doc], starts_q[doc + 1])
        rows_k = slice(starts_k[doc], starts_k[doc + 1])
        out, lse = _attention_oracle_dense(q[rows_q].transpose(0, 1)[None], k[rows_k].transpose(0, 1)[None],
                                           v[rows_k].transpose(0, 1)[None], causal, left, right, scale)
        outs.append(out[0].transpose(0, 1))  # (T_doc, Hq, D)
        lses.append(lse[0].transpose(0, 1))  # (T_doc, Hq)
    return torch.cat(outs), torch.cat(lses)


def _attention_oracle_dense(q, k, v, causal, left, right, scale):
    queries, keys = q.shape[2], k.shape[2]
    kv_head = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])  # query head -> kv head
    k, v = k.index_select(1, kv_head), v.index_select(1, kv_head)  # (B, Hq, S, D)
    # distance of key j right of query i's diagonal, the diagonal at j = i + (S - T)
    distance = (torch.arange(keys, device=q.device)[None, :] - torch.arange(queries, device=q.device)[:, None]
                - (keys - queries))  # (T, S)
    visible = torch.ones(queries, keys, dtype=torch.bool, device=q.device)
    if causal:
        visible &= distance <= 0
    if left >= 0:
        visible &= distance >= -left
    if right >= 0:
        visible &= distance <= right
    sees_a_key = visible.any(-1, keepdim=True)  # (T, 1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q @ k.transpose(-1, -2) * scale).to(acc).masked_fill(~visible, float("-inf"))  # (B, Hq, T, S)
    scores = torch.where(sees_a_key, scores, torch.zeros_like(scores))  # finite where nothing is seen
    probs = torch.softmax(scores, dim=-1) * sees_a_key
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~sees_a_key[:, 0], float("-inf"))  # (B, Hq, T)
    return probs.to(q.dtype) @ v, lse


# ---- attention: the second baseline and the floor of its gradients --------------------------

def flash_attention_grads(q, k, v, grad_out, causal=False, window=None, scale=None, cu_seqlens=None,
                          max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None):
    """dq, dk, dv by the FlashAttention-2 backward (Dao 2023, Algorithm 2) in torch, in q's dtype
    with float32 accumulation: P recomputed from the float32 lse, delta = rowsum(dO * O) from the
    rounded output, dS = P * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.

    The second baseline of the tolerance rule for the gradients: autograd through softmax
    computes sum_j P_ij dP_ij directly, while every flash backward (ours on each backend) takes
    delta from the output, and in float32 the two differ by several times the softmax
    backward's own error (dq 2.7e-6 against 6.0e-7 on a packed causal case, T = 64, D = 64):
    a bound of 2x the softmax form alone failed correct kernels on some draws."""
    del max_seqlen, max_seqlen_k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    left, right = (-1, -1) if window is None else window
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dout = grad_out.to(q.dtype)
    if cu_seqlens is None:
        docs = [(slice(b, b + 1), slice(b, b + 1)) for b in range(q.shape[0])]
        view = (lambda t, rows: t[rows][0])  # (H, L, D)
    else:
        cu_q = cu_seqlens.tolist()
        cu_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else cu_q
        docs = [(slice(a, b), slice(c, d)) for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
        view = (lambda t, rows: t[rows].transpose(0, 1))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows_q, rows_k in docs:
        qd, kd, vd, gd = view(q, rows_q), view(k, rows_k), view(v, rows_k), view(dout, rows_q)
        group = qd.shape[0] // kd.shape[0]
        kk, vv = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)  # (Hq, Lk, D)
        vis = visible_mask(qd.shape[1], kd.shape[1], causal, left, right, q.device)
        s = (qd @ kk.transpose(-1, -2) * scale).to(acc).masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True).float().to(acc)           # saved as float32
        p = torch.where(lse == float("-inf"), 0.0, torch.exp(s - lse))        # (Hq, L, Lk)
        out = (p.to(q.dtype) @ vv).to(acc)                                     # the rounded output
        g = gd.to(acc)
        ds = p * (g @ vv.to(acc).transpose(-1, -2) - (g * out).sum(-1, keepdim=True))
        dq_d = scale * ds @ kk.to(acc)
        dk_d = (scale * ds.transpose(-1, -2) @ qd.to(acc)).unflatten(0, (-1, group)).sum(1)
        dv_d = (p.transpose(-1, -2) @ g).unflatten(0, (-1, group)).sum(1)
        for full, part, rows in ((dq, dq_d, rows_q), (dk, dk_d, rows_k), (dv, dv_d, rows_k)):
            if cu_seqlens is None:
                full[rows] = part.to(q.dtype)[None]
            else:
                full[rows] = part.to(q.dtype).transpose(0, 1)
    return dq, dk, dv


def lse_floor_ulps(lse: torch.Tensor) -> float:
    """The floor of the bound of out and the gradients, in ulps: 2 * max(1, max |lse|).

    Every backward recomputes P = exp(s - lse) from the float32 lse the forward saved (as exp2 of
    (s - lse) * log2(e) in the kernels), so an absolute rounding error of eps * |lse| in the
    exponent is a relative error of eps * |lse| in every probability, and so in every term of
    dq, dk and dv: |lse| ulps that torch's softmax backward (which never rounds an lse) does not
    pay. The forward's exp2 of the rescaled scores costs out the same way (out of T = 1, S = 33:
    4.2e-7 > 2 x 1.2e-7 + 2 ulps on one draw, AVX2). Measured over 12 draws of the dense cases
    in float32 on each vector path: up to 3.7 ulps above 2x the baseline error were needed where
    max |lse| was 3.8 to 6.0."""
    finite = lse[torch.isfinite(lse)]
    return 2.0 * max(1.0, finite.abs().max().item()) if finite.numel() else 2.0


ALL_BACKENDS = ("torch", "cpu", "triton", "cuda")


# ---- the C++ kernels' vector paths ----------------------------------------------------------
# slmfast._C holds each CPU kernel once per vector ISA ("default", "avx2", "avx512") and picks one
# at run time. Every test of the cpu backend that goes through backend_params runs once per path
# this machine can execute (a machine with AVX-512 also tests the AVX2 and default paths): the
# param carries the mark `cpu_capability(name)` and the autouse fixture of tests/conftest.py runs
# the test inside backends.use_cpu_capability(name).

@functools.cache
def cpu_capabilities_here() -> tuple[str, ...]:
    """The vector paths of the C++ CPU kernels this machine runs, highest first: compiled into
    slmfast._C and supported by this CPU, and not above SLMFAST_CPU_CAPABILITY when that caps the
    choice. Empty when the extension is not built, or when it cannot switch paths at run time
    (built before the per-ISA kernels): the cpu backend then runs once, on the build's one path."""
    try:
        caps = backends.cpu_capabilities()
    except (AttributeError, RuntimeError):  # no cpu_capability_info in _C, or a bad env cap
        return ()
    supported = set(caps.get("supported") or ())
    names = [name for name in caps.get("compiled") or () if name in supported]
    cap = os.environ.get(backends.ENV_CPU_CAPABILITY)
    if cap in backends.CPU_CAPABILITIES:
        rank = backends.CPU_CAPABILITIES.index
        names = [name for name in names if rank(name) <= rank(cap)]
    return tuple(reversed(names))


def cpu_capability_params(capabilities: str = "all") -> list:
    """One pytest param per vector path (value: its name, id: the name, mark: cpu_capability), for
    tests that call the cpu backend without taking a `backend` parameter. "best" keeps only the
    path the machine would choose by itself. [None] (no mark) when paths cannot be switched."""
    names = cpu_capabilities_here()
    if capabilities == "best":
        names = names[:1]
    elif capabilities != "all":
        raise ValueError(f"capabilities must be 'all' or 'best', got {capabilities!r}")
    if not names:
        return [pytest.param(None, id="cpu")]
    return [pytest.param(name, marks=pytest.mark.cpu_capability(name), id=name) for name in names]


def best_capability_only(*values, id=None):
    """A param (of a shape, say) that the cpu backend runs on the machine's best vector path only:
    tests/conftest.py deselects its lower-path copies. For inputs so large that the default
    (scalar) path would add minutes while smaller shapes of the same test already run every path."""
    return pytest.param(*values, marks=pytest.mark.cpu_capability(best_only=True), id=id)


def backend_params(implemented=ALL_BACKENDS, capabilities: str = "all"):
    """pytest params for each backend, skipped (with the reason) where it is unavailable here.

    The value is the backend's name. "cpu" becomes one param per vector path of the C++ kernels
    (ids cpu-avx512, cpu-avx2, cpu-default; see cpu_capability_params), or only the best one with
    capabilities="best" (for tests whose lower paths add time and nothing the op tests do not
    already cover); a plain "cpu" param when the extension cannot switch paths."""
    params = []
    for name in implemented:
        state = backends.status(name)
        marks = [] if state.available else [pytest.mark.skip(reason=f"{name}: {state.reason}")]
        if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
            marks.append(pytest.mark.gpu)  # what `pytest -m gpu` (gpu_check.sh) runs
        if name == "cpu" and state.available:
            for cap in cpu_capability_params(capabilities):
                suffix = f"-{cap.values[0]}" if cap.values[0] is not None else ""
                params.append(pytest.param(name, marks=[*marks, *cap.marks], id=name + suffix))
            continue
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device_for(backend: str) -> torch.device:
    """Where a backend's test inputs live: the GPU for cuda (and triton when there is a GPU)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def value_and_grads(fn, *inputs, grad_output: torch.Tensor | None = None):
    """fn(*leaves) and the gradients of (output . grad_output) (of the output itself when it is a
    scalar) w.r.t. every floating input that is not None, each leaf a fresh copy of its input."""
    leaves = [t.detach().clone().requires_grad_(True)
              if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t for t in inputs]
    out = fn(*leaves)
    weighted = out.double() * grad_output if grad_output is not None else out.double()
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(weighted.sum(), wanted)
    return out.detach(), list(grads)
