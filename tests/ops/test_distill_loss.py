"""Distillation losses (distill_loss, distill_loss_from_logits, topk_distill_loss) on every
available backend against the unfused float64 references."""

import pytest
import torch

from slmfast import backends
from slmfast.functional import distill_loss, distill_loss_from_logits, topk_distill_loss
from slmfast.ops import _loss_chunks as C
from slmfast.ops import _loss_math as M
from slmfast.ops import distill_loss as distill_ops
from slmfast.ops.distill_loss import (
    distill_loss_from_logits_reference,
    distill_loss_reference,
    topk_distill_loss_reference,
)
from tests.helpers import (
    assert_close,
    backend_params,
    cpu_capability_params,
    device_for,
    mean_error_spread,
    value_and_grads,
)

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params(("torch", "cpu", "triton"))
KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "torch"]
INTERPRETED = not torch.cuda.is_available()
KINDS = ["forward_kl", "reverse_kl", "jsd", "tvd"]
# kind x temperature: every kind at every temperature over the four cases of a backend
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
CASES = [(k, TEMPERATURES[(i + j) % 4], (0.0, 0.7)[j % 2]) for i, k in enumerate(KINDS) for j in range(4)]


def _hidden_inputs(n, hs, ht, vs, vt, dtype, device, ignore_every=4, target_vocab=None):
    sh = torch.randn(n, hs, device=device).to(dtype)
    sw = (torch.randn(vs, hs, device=device) * 2 / hs ** 0.5).to(dtype)
    th = torch.randn(n, ht, device=device).to(dtype)
    tw = (torch.randn(vt, ht, device=device) * 2 / ht ** 0.5).to(dtype)
    target = torch.randint(0, target_vocab or min(vs, vt), (n,), device=device)
    target[::ignore_every] = -100
    return sh, sw, th, tw, target


def _check_hidden(backend, sh, sw, th, tw, target, sb=None, tb=None, chunk_size=None, **options):
    def ours(h, w, b=None):
        return distill_loss(h, w, th, tw, target, student_bias=b, teacher_bias=tb, chunk_size=chunk_size,
                            backend=backend, **options)

    def ref(h, w, b=None):
        return distill_loss_reference(h, w, th, tw, target, student_bias=b, teacher_bias=tb, **options)

    def ref64(h, w, b=None):
        return distill_loss_reference(h.double(), w.double(), th.double(), tw.double(), target,
                                      student_bias=b.double() if b is not None else None,
                                      teacher_bias=tb.double() if tb is not None else None, **options)

    args = (sh, sw) if sb is None else (sh, sw, sb)
    got, base, exact = (value_and_grads(f, *args) for f in (ours, ref, ref64))
    assert got[0].dtype == sh.dtype
    per_row = dict(options, reduction="none")

    def rows(cast):
        with torch.no_grad():
            return distill_loss_reference(cast(sh), cast(sw), cast(th), cast(tw), target,
                                          student_bias=cast(sb) if sb is not None else None,
                                          teacher_bias=cast(tb) if tb is not None else None, **per_row)

    reduction = options.get("reduction", "mean")
    spread = _loss_spread(rows(lambda t: t), rows(lambda t: t.double()), target, reduction)
    assert_close("loss", got[0], base[0], exact[0], baseline_error=spread)
    terms = _gemm_terms(sh, sw, th, tw, target, sb, tb, options)
    for name, a, b, c in zip(("dhidden", "dweight", "dbias"), got[1], base[1], exact[1]):
        assert_close(name, a, b, c, terms=terms[name])


def _gemm_terms(sh, sw, th, tw, target, sb, tb, options):
    """The largest sum of |terms| of one entry of each gradient (assert_close's `terms`).

    With G = d loss / d student logits, dhidden = G W, dweight = G^T h, dbias = sum_rows G, and
    each entry of G is itself a cancelling sum over the vocabulary (T (w - q sum w) for the soft
    part, q - onehot for the hard one), whose terms are probabilities times O(1) factors (log
    ratios for reverse_kl and jsd): |G_terms| = row weight * (T (q + p)(1 + |log q - log p|) +
    hard_weight (q1 + onehot)), q1 = softmax(s). The terms of the three gradients are then
    |G_terms| |W|, |G_terms|^T |h| and sum_rows |G_terms|. These gradients cancel: a dhidden of
    1.5e-3 (jsd, T = 0.5) or a dweight of 1e-2 (tvd, T = 1, offset 14) is made of terms several
    times larger, and 2 ulps of the result failed correct kernels on some draws (the tvd case:
    5.4e-9 > 5.2e-9 on an AVX2 machine)."""
    h, w = sh.double(), sw.double()
    logits = h @ w.t() + (sb.double() if sb is not None else 0)
    teacher = th.double() @ tw.double().t() + (tb.double() if tb is not None else 0)
    g = _logit_grad_terms(logits, teacher, target, options)
    return {"dhidden": (g @ w.abs()).max().item(), "dweight": (g.t() @ h.abs()).max().item(),
            "dbias": g.sum(0).max().item()}


def _logit_grad_terms(logits, teacher, target, options):
    """Per entry of G = d loss / d student logits, the magnitude of the terms it is summed from
    (see _gemm_terms): row weight * (T (q + p)(1 + |log q - log p|) + hard_weight (q1 + onehot))."""
    logits, teacher = logits.detach().double(), teacher.detach().double()
    v = min(logits.shape[1], teacher.shape[1], options.get("vocab_size") or logits.shape[1])
    temperature, hard = options.get("temperature", 1.0), options.get("hard_weight", 0.0)
    lq = torch.log_softmax(logits[:, :v] / temperature, -1)
    lp = torch.log_softmax(teacher[:, :v] / temperature, -1)
    mag = temperature * (lq.exp() + lp.exp()) * (1 + (lq - lp).abs())
    valid = torch.ones(logits.shape[0], dtype=torch.bool) if target is None else (target.cpu() != -100)
    if hard and target is not None:
        onehot = torch.nn.functional.one_hot(target.cpu().clamp(min=0), logits.shape[1])[:, :v]
        mag = mag + hard * (torch.softmax(logits[:, :v], -1) + onehot)
    weight = 1.0 if options.get("reduction") == "sum" else 1.0 / max(int(valid.sum()), 1)
    g = torch.zeros_like(logits)
    g[:, :v] = mag * weight * valid[:, None]
    return g


def _loss_spread(rows, rows64, target, reduction):
    """The rounding error to expect of the scalar loss, from the baseline's per-row errors.

    The loss is a mean (or a sum) of rows, each a sum over V rounded terms, so its rounding error
    is a random draw, of which the baseline's one scalar error is a poor estimate: 2x that draw
    failed correct runs (tvd, T = 1 on an AVX2 machine; V = 32001 on the default vector path:
    3.2e-6 > 2 x 3.7e-7 + floor, with per-row errors of 1e-6). helpers.mean_error_spread gives
    the spread from every row's error; a sum of n rows spreads n times as much as their mean."""
    valid = target != -100 if target is not None else torch.ones(rows.shape[0], dtype=torch.bool)
    spread = mean_error_spread(rows[valid.to(rows.device)], rows64[valid.to(rows.device)])
    return spread * int(valid.sum()) if reduction == "sum" else spread


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "{}-T{}-hard{}".format(*CASES[i]))
def test_distill_loss_matches_fp64_reference(backend, case):
    kind, temperature, hard_weight = CASES[case]
    sh, sw, th, tw, target = _hidden_inputs(21, 16, 24, 97, 97, torch.float32, device_for(backend))
    _check_hidden(backend, sh, sw, th, tw, target, chunk_size=8, kind=kind, beta=0.4, temperature=temperature,
                  hard_weight=hard_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_reduced_precision_inputs(backend, dtype, kind):
    sh, sw, th, tw, target = _hidden_inputs(19, 16, 16, 83, 83, dtype, device_for(backend))
    _check_hidden(backend, sh, sw, th, tw, target, chunk_size=6, kind=kind, temperature=2.0, hard_weight=0.5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_under_cpu_autocast(backend):
    """Mixed precision as the trainer runs it: float32 inputs, bf16 products, a float32 loss (as
    F.cross_entropy's under autocast). Baseline: the reference under the same autocast; oracle:
    float64 on the bf16-rounded inputs."""
    sh, sw, th, tw, target = _hidden_inputs(13, 16, 24, 40, 40, torch.float32, torch.device("cpu"))

    def rounded(t):
        return t.bfloat16().double()

    def ours(h, w):
        return distill_loss(h, w, th, tw, target, hard_weight=0.5, backend=backend)

    def reference(h, w):
        return distill_loss_reference(h, w, th, tw, target, hard_weight=0.5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, base = value_and_grads(ours, sh, sw), value_and_grads(reference, sh, sw)
        rows = distill_loss_reference(sh, sw, th, tw, target, hard_weight=0.5, reduction="none")
    exact = value_and_grads(lambda h, w: distill_loss_reference(
        rounded(h), rounded(w), rounded(th), rounded(tw), target, hard_weight=0.5), sh, sw)
    rows64 = distill_loss_reference(rounded(sh), rounded(sw), rounded(th), rounded(tw), target,
                                    hard_weight=0.5, reduction="none")
    assert got[0].dtype == torch.float32
    # bf16 logits: each row's loss is off by ~1e-3 at random, and the mean's error is one draw of
    # that (the baseline's was 2e-4 where ours was 3.9e-3 on one draw, the default vector path):
    # the bound takes the spread from the 10 rows' errors (_loss_spread).
    spread = _loss_spread(rows.float(), rows64, target, "mean")
    assert_close("loss", got[0], base[0].float(), exact[0], baseline_error=spread)
    for name, a, b, c in zip(("dhidden", "dweight"), got[1], base[1], exact[1]):
        assert_close(name, a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", ["teacher", "student", "both_vocab_size"])
def test_vocab_padding_is_masked(backend, padded):
    device = device_for(backend)
    vs, vt, vocab_size = {"teacher": (67, 128, None), "student": (128, 67, None),
                          "both_vocab_size": (80, 96, 67)}[padded]
    sh, sw, th, tw, target = _hidden_inputs(11, 8, 8, vs, vt, torch.float32, device, target_vocab=67)
    sb = torch.randn(vs, device=device)
    _check_hidden(backend, sh, sw, th, tw, target, sb=sb, chunk_size=4, kind="jsd", hard_weight=0.3,
                  vocab_size=vocab_size)
    # the padding rows of the student's weight and bias get exactly zero gradient
    got = value_and_grads(lambda h, w, b: distill_loss(h, w, th, tw, target, student_bias=b,
                                                       vocab_size=vocab_size, backend=backend), sh, sw, sb)
    assert torch.equal(got[1][1][67:], torch.zeros_like(got[1][1][67:]))
    assert torch.equal(got[1][2][67:], torch.zeros_like(got[1][2][67:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_not_a_multiple_of_the_block(backend):
    v = 1001 if backend == "triton" and INTERPRETED else 32001
    sh, sw, th, tw, target = _hidden_inputs(5, 8, 8, v, v, torch.float32, device_for(backend))
    _check_hidden(backend, sh, sw, th, tw, target, kind="reverse_kl", temperature=2.0, hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_target_and_sum(backend):
    sh, sw, th, tw, _ = _hidden_inputs(10, 8, 8, 50, 50, torch.float32, device_for(backend))
    _check_hidden(backend, sh, sw, th, tw, None, kind="tvd", reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    sh, sw, th, tw, target = _hidden_inputs(6, 8, 8, 30, 30, torch.float32, device_for(backend))
    th.requires_grad_()
    tw.requires_grad_()
    sh.requires_grad_()
    distill_loss(sh, sw, th, tw, target, kind="reverse_kl", backend=backend).backward()
    assert th.grad is None and tw.grad is None and sh.grad is not None


# ---- JSD(beta): endpoints and limits ----------------------------------------------------------

def test_jsd_endpoints_are_the_kls_and_the_limits_hold():
    s = torch.randn(7, 40, dtype=torch.float64)
    t = torch.randn(7, 40, dtype=torch.float64)

    def f(kind, beta=0.5):
        return distill_loss_from_logits(s, t, kind=kind, beta=beta, temperature=2.0, backend="torch")

    assert torch.equal(f("jsd", 0.0), f("forward_kl"))  # beta = 0: KL(teacher || student)
    assert torch.equal(f("jsd", 1.0), f("reverse_kl"))  # beta = 1: KL(student || teacher)
    eps = 1e-6  # the mixture form vanishes at the ends; divided by beta (1 - beta) it tends to the KLs
    torch.testing.assert_close(f("jsd", eps) / eps, f("forward_kl"), rtol=1e-4, atol=0)
    torch.testing.assert_close(f("jsd", 1 - eps) / eps, f("reverse_kl"), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_beta_on_every_backend(backend, beta):
    device = device_for(backend)
    s = torch.randn(9, 45, device=device) * 2
    t = torch.randn(9, 45, device=device) * 2
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta)
    got = value_and_grads(lambda x: distill_loss_from_logits(x, t, kind="jsd", beta=beta, backend=backend), s)
    if kind is not None:
        same = value_and_grads(lambda x: distill_loss_from_logits(x, t, kind=kind, backend=backend), s)
        assert torch.equal(got[0], same[0]) and torch.equal(got[1][0], same[1][0])
    base = value_and_grads(lambda x: distill_loss_from_logits_reference(x, t, kind="jsd", beta=beta), s)
    exact = value_and_grads(lambda x: distill_loss_from_logits_reference(x.double(), t.double(), kind="jsd",
                                                                         beta=beta), s)
    assert_close("loss", got[0], base[0], exact[0])
    # dlogits = T (w - q sum w) cancels: the floor counts its terms (_logit_grad_terms), summed over
    # the 45 classes (6.98e-9 > 2 x 2.3e-9 + 2 ulps of the result on one draw, triton, beta 0.5)
    terms = _logit_grad_terms(s, t, None, {"kind": "jsd", "beta": beta}).max().item()
    assert_close("dlogits", got[1][0], base[1][0], exact[1][0], terms=terms, reduction=s.shape[-1])


# ---- distill_loss_from_logits ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_from_logits_matches_fp64_reference(backend, dtype, kind, reduction):
    device = device_for(backend)
    s = (torch.randn(3, 5, 77, device=device) * 2).to(dtype)
    t = (torch.randn(3, 5, 77 + 13, device=device) * 2).to(dtype)  # padded teacher
    target = torch.randint(0, 77, (3, 5), device=device)
    target[0, ::2] = -100
    g = torch.randn(3, 5, dtype=torch.float64, device=device) if reduction == "none" else None
    options = dict(kind=kind, temperature=2.0, hard_weight=0.5, reduction=reduction)
    got = value_and_grads(lambda x: distill_loss_from_logits(x, t, target, backend=backend, **options), s,
                          grad_output=g)
    base = value_and_grads(lambda x: distill_loss_from_logits_reference(x, t, target, **options), s,
                           grad_output=g)
    exact = value_and_grads(
        lambda x: distill_loss_from_logits_reference(x.double(), t.double(), target, **options), s,
        grad_output=g)
    assert_close("loss", got[0], base[0], exact[0])
    assert_close("dlogits", got[1][0], base[1][0], exact[1][0])


# ---- top-k --------------------------------------------------------------------------------

def _topk_inputs(n, h, v, k, dtype, device):
    sh = torch.randn(n, h, dtype=dtype, device=device)
    sw = torch.randn(v, h, dtype=dtype, device=device) * 2 / h ** 0.5
    teacher = torch.randn(n, v, dtype=torch.float64, device=device) * 2
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    target = torch.randint(0, v, (n,), device=device)
    target[::3] = -100
    return sh, sw, teacher, ids, logprobs.to(dtype), target


@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_v_is_the_dense_loss(tail, kind):
    sh, sw, teacher, ids, logprobs, target = _topk_inputs(13, 8, 37, 37, torch.float64, torch.device("cpu"))
    options = dict(kind=kind, temperature=2.0, hard_weight=0.3, target=target)
    got = value_and_grads(
        lambda h, w: topk_distill_loss(h, w, ids, logprobs, tail=tail, chunk_size=5, **options), sh, sw)
    dense = value_and_grads(
        lambda h, w: distill_loss_from_logits(h @ w.t(), teacher, backend="torch", **options), sh, sw)
    torch.testing.assert_close(got[0], dense[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[1], dense[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_matches_fp64_reference(dtype, tail, kind):
    sh, sw, _, ids, logprobs, target = _topk_inputs(17, 8, 61, 6, dtype, torch.device("cpu"))
    options = dict(kind=kind, beta=0.3, temperature=(0.5, 1.0, 2.0, 4.0)[KINDS.index(kind)], hard_weight=0.5,
                   target=target)
    got = value_and_grads(
        lambda h, w: topk_distill_loss(h, w, ids, logprobs, tail=tail, chunk_size=4, **options), sh, sw)
    base = value_and_grads(
        lambda h, w: topk_distill_loss_reference(h @ w.t(), ids, logprobs, tail=tail, **options), sh, sw)
    exact = value_and_grads(
        lambda h, w: topk_distill_loss_reference(h.double() @ w.double().t(), ids, logprobs.double(),
                                                 tail=tail, **options), sh, sw)
    assert_close("loss", got[0], base[0], exact[0])
    for name, a, b, c in zip(("dhidden", "dweight"), got[1], base[1], exact[1]):
        assert_close(name, a, b, c)


# ---- bf16/fp16 on the CPU: the two-pass path (tile-by-tile weight gradient) ------------------

# (N, V, chunk_size, two_pass sizes (C, Ct, Vt, R) with Hs = Ht = 16): one token, V = 83 in one
# tile of 128 columns; 17 tokens in one pass-2 chunk, V = 130 = 64 + 64 + 2 columns; 150 tokens in
# pass-1 chunks of 32 and pass-2 chunks of 64 (their tile gradient summed in float32), V = 300 =
# 4 x 64 + 44.
TWO_PASS_SHAPES = [(1, 83, None, (1, 1, 128, 1)), (17, 130, 8, (8, 17, 64, 17)),
                   (150, 300, 32, (32, 64, 64, 64))]


def _two_pass_calls(monkeypatch):
    """The sizes of each C.two_pass call from here on (the tests check that the path ran)."""
    calls, run = [], C.two_pass

    def counted(*args, **kwargs):
        calls.append(args[6])
        return run(*args, **kwargs)

    monkeypatch.setattr(C, "two_pass", counted)
    return calls


def _two_pass_target(target, n):
    """One token: not ignored. 150 tokens: rows 32-127 ignored as well (a whole pass-1 chunk and a
    whole pass-2 chunk)."""
    if n == 1:
        target[0] = 5
    if n == 150:
        target[32:128] = -100
    return target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", range(3), ids=["N1-V83", "N17-V130", "N150-V300"])
def test_two_pass_matches_fp64_reference(backend, dtype, kind, shape, monkeypatch):
    """T = 2, a hard loss with ignored rows, both biases, and vocabulary padding: the teacher's
    (N = 1), the student's (N = 17, reduction "sum"), both with vocab_size (N = 150)."""
    n, v, chunk, sizes = TWO_PASS_SHAPES[shape]
    device = device_for(backend)
    vs, vt, vocab_size = [(v, v + 13, None), (v + 13, v, None), (v + 20, v + 7, v)][shape]
    sh, sw, th, tw, target = _hidden_inputs(n, 16, 16, vs, vt, dtype, device, target_vocab=v)
    target = _two_pass_target(target, n)
    sb = (torch.randn(vs, device=device) * 0.5).to(dtype)
    tb = (torch.randn(vt, device=device) * 0.5).to(dtype)
    calls = _two_pass_calls(monkeypatch)
    _check_hidden(backend, sh, sw, th, tw, target, sb=sb, tb=tb, chunk_size=chunk, kind=kind, beta=0.4,
                  temperature=2.0, hard_weight=0.5, vocab_size=vocab_size,
                  reduction="sum" if shape == 1 else "mean")
    assert calls == ([sizes] if device.type == "cpu" else [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", range(3), ids=["N1-V83-k6", "N17-V130-k130", "N150-V300-k6"])
def test_topk_two_pass_matches_fp64_reference(dtype, tail, kind, shape, monkeypatch):
    """T = 2, a hard loss with ignored rows, a bias; k = V at N = 17 (no tail: "bucket" is "none")."""
    n, v, chunk, _ = TWO_PASS_SHAPES[shape]
    k = v if shape == 1 else 6
    sh, sw, _, ids, logprobs, target = _topk_inputs(n, 16, v, k, dtype, torch.device("cpu"))
    target = _two_pass_target(target, n)
    sb = (torch.randn(v) * 0.5).to(dtype)
    options = dict(kind=kind, beta=0.3, temperature=2.0, hard_weight=0.5, target=target)
    calls = _two_pass_calls(monkeypatch)
    got = value_and_grads(lambda h, w, b: topk_distill_loss(h, w, ids, logprobs, tail=tail, chunk_size=chunk,
                                                            student_bias=b, **options), sh, sw, sb)
    base = value_and_grads(
        lambda h, w, b: topk_distill_loss_reference(h @ w.t() + b, ids, logprobs, tail=tail, **options),
        sh, sw, sb)
    exact = value_and_grads(
        lambda h, w, b: topk_distill_loss_reference(h.double() @ w.double().t() + b.double(), ids,
                                                    logprobs.double(), tail=tail, **options), sh, sw, sb)
    assert len(calls) == 1
    assert_close("loss", got[0], base[0], exact[0])
    for name, a, b, c in zip(("dhidden", "dweight", "dbias"), got[1], base[1], exact[1]):
        assert a.dtype == dtype
        assert_close(name, a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_tile_gradient_equals_the_row_gradient(backend, kind):
    """distill_loss's tile function (the teacher's logits of the tile from a padded weight with a
    bias, then M.distill_tile_grad_ from the row stats of the backend's pass 1) writes on column
    tiles, column for column, what the backend's one-pass row function writes on the full rows:
    T = 2, a hard loss, a scale per row, ignored rows (one holding NaN: exactly 0)."""
    device = device_for(backend)
    n, vocab = 23, 250
    sh, sw, th, tw, target = _hidden_inputs(n, 12, 10, vocab + 6, vocab + 10, torch.float32, device,
                                            target_vocab=vocab)
    sb, tb = torch.randn(vocab + 6, device=device), torch.randn(vocab + 10, device=device)
    args = (M.resolve_kind("test", kind, 0.4), 0.4, 2.0, 0.5, -100)
    logits = C.logits_of(sh, sw, sb, vocab)                                           # (N, V)
    logits[4] = float("nan")  # an ignored row
    teacher = C.logits_of(th, tw, tb, vocab)                                          # (N, V)
    scale = torch.rand(n, device=device) + 0.5
    expected = logits.clone()
    C.distill_rows(backend, expected, teacher, target, scale, *args)
    _, stats = distill_ops._distill_rows(backend, logits.clone(), teacher, target, None, *args,
                                         with_stats=True)
    tile_fn = distill_ops._distill_tile_fn(th, tw, tb, target, args)
    got = logits.clone()
    for c0 in range(0, vocab, 64):  # tiles of 64 columns, the last 58
        got[:, c0:c0 + 64] = tile_fn(0, n, c0, got[:, c0:c0 + 64].contiguous(), stats, scale)
    assert torch.equal(got[4], torch.zeros_like(got[4]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_tile_gradient_equals_the_row_gradient(tail, kind):
    """M.topk_tile_grad_ on column tiles from topk_rows_torch's row stats writes what
    topk_rows_torch writes on the full rows (ids spread over the tiles, T = 2, a hard loss, a scale
    per row, ignored rows, one holding NaN)."""
    n, v, k = 23, 250, 7
    logits = torch.randn(n, v) * 3
    logprobs, ids = torch.log_softmax(torch.randn(n, v, dtype=torch.float64) * 2, -1).topk(k, -1)
    logprobs = logprobs.float()
    target = torch.randint(0, v, (n,))
    target[::4] = -100
    logits[4] = float("nan")
    scale = torch.rand(n) + 0.5
    args = (M.resolve_kind("test", kind, 0.3), 0.3, 2.0, 0.5, -100)
    expected = logits.clone()
    M.topk_rows_torch(expected, ids, logprobs, target, scale, *args, tail)
    _, stats = M.topk_rows_torch(logits.clone(), ids, logprobs, target, None, *args, tail, with_stats=True)
    got = logits.clone()
    for c0 in range(0, v, 64):
        got[:, c0:c0 + 64] = M.topk_tile_grad_(got[:, c0:c0 + 64].contiguous(), ids, target, stats, scale, c0,
                                               *args, M.topk_tail(tail, k, v))
    assert torch.equal(got[4], torch.zeros_like(got[4]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_pass_all_ignored_rows_give_zeros(backend, reduction):
    """Every row ignored: loss and gradients exactly 0 (no NaN), for both losses."""
    device = device_for(backend)
    sh, sw, th, tw, target = _hidden_inputs(17, 8, 8, 70, 70, torch.bfloat16, device)
    target[:] = -100
    sb = torch.randn(70, device=device).to(torch.bfloat16)
    options = dict(hard_weight=0.5, temperature=2.0, reduction=reduction, chunk_size=8, target=target)
    runs = [lambda h, w, b: distill_loss(h, w, th, tw, student_bias=b, backend=backend, kind="jsd",
                                         **options)]
    if backend == "torch":
        ids = torch.randn(17, 70, device=device).topk(5, -1).indices
        logprobs = torch.full((17, 5), -2.0, device=device, dtype=torch.bfloat16)
        runs.append(lambda h, w, b: topk_distill_loss(h, w, ids, logprobs, tail="bucket", student_bias=b,
                                                      **options))
    for run in runs:
        loss, grads = value_and_grads(run, sh, sw, sb)
        assert loss.item() == 0.0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op, backend", [("distill_loss", "torch"), ("distill_loss", "cpu"),
                                         ("topk_distill_loss", "torch")])
@pytest.mark.parametrize("path", ["two_pass", "one_pass_control"])
def test_two_pass_allocates_no_float32_weight_sized_tensor(dtype, op, backend, path, monkeypatch):
    """bf16/fp16 on the CPU: no tensor of V x H float32 (twice the weight gradient) at any point
    of the forward and backward. The control forces the one-pass loop, whose float32 sum of grad_W
    over chunks is one: the check sees it there."""
    from torch.profiler import ProfilerActivity, profile

    if path == "one_pass_control":
        monkeypatch.setattr(distill_ops, "_two_pass", lambda sh, grad_weight: False)
    n, h, v = 64, 32, 2000
    sh = torch.randn(n, h, dtype=dtype, requires_grad=True)
    sw = (torch.randn(v, h) / h ** 0.5).to(dtype).requires_grad_()
    sb = torch.randn(v, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (n,))
    th, tw = torch.randn(n, h, dtype=dtype), (torch.randn(v, h) / h ** 0.5).to(dtype)
    ids, logprobs = torch.randn(n, v).topk(8, -1).indices, torch.full((n, 8), -3.0, dtype=dtype)
    options = dict(student_bias=sb, target=target, hard_weight=0.5, temperature=2.0, chunk_size=16,
                   backend=backend)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if op == "distill_loss":
            loss = distill_loss(sh, sw, th, tw, kind="jsd", **options)
        else:
            loss = topk_distill_loss(sh, sw, ids, logprobs, tail="bucket", **options)
        loss.backward()
    sizes = {}  # the largest allocation of each aten op
    for e in prof.events():
        if e.name.startswith("aten::"):
            sizes[e.name] = max(sizes.get(e.name, 0), e.cpu_memory_usage)
    largest = max(sizes.values())
    if path == "two_pass":
        assert 0 < largest < v * h * 4, f"{max(sizes, key=sizes.get)} allocated {largest} bytes"
    else:
        assert largest >= v * h * 4
    assert sw.grad.dtype == dtype and sb.grad is not None


# ---- normalization, gradcheck, registration ---------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_gradient_accumulation_equals_one_big_batch(backend):
    device = device_for(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    sh, sw, th, tw, target = _hidden_inputs(30, 8, 8, 41, 41, dtype, device, ignore_every=3)
    total = int((target != -100).sum())
    options = dict(kind="jsd", hard_weight=0.5, temperature=2.0, backend=backend)
    full = value_and_grads(lambda h, w: distill_loss(h, w, th, tw, target, **options), sh, sw)
    w_leaf = sw.clone().requires_grad_()
    acc_loss, grads_h = 0.0, []
    for part in (slice(0, 11), slice(11, 30)):
        h_leaf = sh[part].clone().requires_grad_()
        loss = distill_loss(h_leaf, w_leaf, th[part], tw, target[part], num_items=torch.tensor(total),
                            **options)
        loss.backward()
        acc_loss, grads_h = acc_loss + loss.detach(), grads_h + [h_leaf.grad]
    torch.testing.assert_close(acc_loss, full[0])
    torch.testing.assert_close(torch.cat(grads_h), full[1][0])
    torch.testing.assert_close(w_leaf.grad, full[1][1])


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(kind, capability):
    sh = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    sw = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    sb = torch.randn(9, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(6, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    target = torch.tensor([0, 8, -100, 3, 3, 5])

    def fn(h, w, b):
        return distill_loss(h, w, th, tw, target, student_bias=b, kind=kind, beta=0.3, temperature=1.5,
                            hard_weight=0.4, chunk_size=4, backend="cpu")

    assert torch.autograd.gradcheck(fn, (sh, sw, sb))
    s = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: distill_loss_from_logits(x, t, target[:5], kind=kind, reduction="none", hard_weight=0.4,
                                           backend="cpu"), (s,))


@pytest.mark.parametrize("tail", ["none", "bucket"])
def test_topk_gradcheck_fp64(tail):
    sh = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    sw = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    sb = torch.randn(9, dtype=torch.float64, requires_grad=True)
    lp, ids = torch.log_softmax(torch.randn(5, 9, dtype=torch.float64), -1).topk(3, -1)
    target = torch.tensor([0, 8, -100, 3, 5])

    def fn(h, w, b):
        return topk_distill_loss(h, w, ids, lp, kind="jsd", beta=0.3, tail=tail, temperature=1.5,
                                 target=target, hard_weight=0.4, chunk_size=2, student_bias=b)

    assert torch.autograd.gradcheck(fn, (sh, sw, sb))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    ns = torch.ops.slmfast_triton if backend == "triton" else torch.ops.slmfast
    s = torch.randn(6, 29, device=device, requires_grad=True)
    t = torch.randn(6, 29, device=device)
    target = torch.tensor([1, 0, -100, 28, 5, 2], device=device)
    for kind in (2, 3):  # registration is kind-independent; jsd and tvd take the most branches
        options = (kind, 0.3, 2.0, 0.5, -100)
        torch.library.opcheck(ns.distill_fwd, (s, t, target, *options))
        _, stats = ns.distill_fwd(s.detach(), t, target, *options)
        torch.library.opcheck(ns.distill_bwd, (torch.randn(6, device=device), s.detach(), t, target, stats,
                                               *options))
    if backend == "cpu":
        torch.library.opcheck(ns.distill_fwd_bwd_,
                              (s.detach().clone(), t, None, torch.ones(()), 1, 0.5, 1.0, 0.0, -100))
    sh, sw, th, tw, target = _hidden_inputs(7, 8, 8, 20, 24, torch.float32, device)
    sb = torch.randn(20, device=device)
    scale = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.slmfast_loss.distill_fused,
                          (sh.requires_grad_(), sw.requires_grad_(), sb.requires_grad_(), th, tw, None,
                           target, scale, 2, 0.3, 2.0, 0.5, -100, 20, 3, True, True, True, backend))
    ids = torch.stack([torch.randperm(20, device=device)[:5] for _ in range(7)])
    torch.library.opcheck(torch.ops.slmfast_loss.topk_distill_fused,
                          (sh, sw, sb, ids, -torch.rand(7, 5, device=device) * 3, target, scale, 0, 0.5, 2.0,
                           0.5, -100, "bucket", 3, True, True, True, "torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    device = device_for(backend)
    sh, sw, th, tw, target = _hidden_inputs(9, 8, 8, 30, 30, torch.float32, device)
    ids = torch.stack([torch.randperm(30, device=device)[:4] for _ in range(9)])
    lp = -torch.rand(9, 4, device=device) * 3

    def step(h, w):
        dense = distill_loss(h * 2, w, th, tw, target, kind="jsd", temperature=2.0, hard_weight=0.3,
                             chunk_size=4, num_items=torch.tensor(5.0), backend=backend)
        logits = distill_loss_from_logits(h @ w.t(), th @ tw.t(), target, kind="tvd", backend=backend)
        topk = topk_distill_loss(h, w, ids, lp, tail="bucket", target=target, chunk_size=4)
        return dense + logits + topk

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = value_and_grads(compiled, sh, sw)
    expected = value_and_grads(step, sh, sw)
    torch.testing.assert_close(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def _args(self, vs=20, vt=20, hs=8, ht=8):
        return torch.randn(4, hs), torch.randn(vs, hs), torch.randn(4, ht), torch.randn(vt, ht)

    def test_bad_kind(self, backend):
        with pytest.raises(ValueError, match="kind must be one of"):
            distill_loss(*self._args(), kind="kl", backend=backend)

    def test_bad_reduction(self, backend):
        with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum'"):
            distill_loss(*self._args(), reduction="none", backend=backend)

    def test_bad_beta_and_temperature(self, backend):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
            distill_loss(*self._args(), kind="jsd", beta=1.5, backend=backend)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            distill_loss(*self._args(), temperature=0.0, backend=backend)

    def test_mismatched_hidden_sizes(self, backend):
        sh, sw, th, tw = self._args()
        with pytest.raises(ValueError, match=r"student_hidden has hidden size 8 but student_weight has"):
            distill_loss(sh, torch.randn(20, 9), th, tw, backend=backend)
        with pytest.raises(ValueError, match=r"teacher_hidden has hidden size 8 but teacher_weight has"):
            distill_loss(sh, sw, th, torch.randn(20, 7), backend=backend)
        with pytest.raises(ValueError, match="teacher_hidden must have the leading shape of student_hidden"):
            distill_loss(sh, sw, torch.randn(5, 8), tw, backend=backend)

    def test_different_tokenizers(self, backend):
        with pytest.raises(ValueError, match="cannot be paddings of one vocabulary"):
            distill_loss(*self._args(vs=32000, vt=32768), backend=backend)
        with pytest.raises(ValueError, match="vocab_size=40 must be in"):
            distill_loss(*self._args(), vocab_size=40, backend=backend)

    def test_target_out_of_range(self, backend):
        with pytest.raises(ValueError, match=r"target\[3\] = 20 is out of range \[0, 20\)"):
            distill_loss(*self._args(vt=30), torch.tensor([1, 2, 3, 20]), backend=backend)

    def test_hard_weight_needs_target(self, backend):
        with pytest.raises(ValueError, match="hard_weight > 0 needs a target"):
            distill_loss(*self._args(), hard_weight=1.0, backend=backend)

    def test_topk_k_larger_than_v(self, backend):
        sh, sw, _, _ = self._args()
        ids = torch.arange(21).expand(4, 21)
        with pytest.raises(ValueError, match=r"k = 21 .* must be in \[1, V = 20\]"):
            topk_distill_loss(sh, sw, ids, torch.zeros(4, 21))

    def test_topk_bad_ids(self, backend):
        sh, sw, _, _ = self._args()
        with pytest.raises(ValueError, match="repeats an id"):
            topk_distill_loss(sh, sw, torch.tensor([[1, 1]] * 4), torch.zeros(4, 2))
        with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
            topk_distill_loss(sh, sw, torch.tensor([[1, 20]] * 4), torch.zeros(4, 2))
        with pytest.raises(ValueError, match="tail must be one of"):
            topk_distill_loss(sh, sw, torch.tensor([[1, 2]] * 4), torch.zeros(4, 2), tail="rest")
