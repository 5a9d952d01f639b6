"""The CPU kernels' run-time choice of vector ISA (csrc/cpu/capability.h, backends.cpu_capabilities).

One build holds every kernel once per capability; these tests check what the extension reports,
that the choice can be capped (environment variable, at import) and changed (set_cpu_capability),
that a process capped to each capability this machine supports runs every op correctly, and that
nothing outside the per-capability kernels uses AVX (tools/isa_check.py), so the library imports
and runs on any x86-64 CPU whatever machine built it. The op-by-op tests themselves run under
every capability through tests/helpers.py's backend parametrization.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from slmfast import backends

ROOT = Path(__file__).resolve().parent.parent
X86 = platform.machine().lower() in ("x86_64", "amd64")

pytestmark = pytest.mark.skipif(backends.extension() is None, reason="slmfast._C is not built")


def _caps():
    return backends.cpu_capabilities()


def test_info_lists_compiled_supported_and_chosen():
    caps = _caps()
    order = list(backends.CPU_CAPABILITIES)
    assert caps["compiled"][0] == "default" and caps["supported"][0] == "default"
    for key in ("compiled", "supported"):
        assert caps[key] == sorted(caps[key], key=order.index), f"{key} must go lowest first"
    if X86:  # the build compiles every x86-64 capability its compiler accepts (gcc/clang: all)
        assert caps["compiled"] == ["default", "avx2", "avx512"]
    else:
        assert caps["compiled"] == ["default"]
    usable = [c for c in caps["compiled"] if c in caps["supported"]]
    if os.environ.get(backends.ENV_CPU_CAPABILITY) in (None, "", "auto"):
        assert caps["chosen"] == usable[-1]  # the best one, uncapped
    assert caps["chosen"] in usable


def test_supported_matches_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not X86 or not cpuinfo.exists():
        pytest.skip("x86-64 Linux only")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    expected = ["default"]
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            expected.append("avx512")
    assert _caps()["supported"] == expected


def test_set_cpu_capability_switches_and_restores():
    usable = [c for c in _caps()["compiled"] if c in _caps()["supported"]]
    before = _caps()["chosen"]
    for name in usable:
        with backends.use_cpu_capability(name):
            assert _caps()["chosen"] == name
    assert _caps()["chosen"] == before


def test_set_cpu_capability_rejects_bad_names():
    with pytest.raises(ValueError, match="one of default, avx2, avx512"):
        backends.set_cpu_capability("avx1024")
    missing = [c for c in backends.CPU_CAPABILITIES if c not in _caps()["supported"]]
    for name in missing:  # only on CPUs that lack one (AVX2-only machines: avx512)
        message = f"asks for the {name} kernels, but this CPU supports only"
        with pytest.raises(RuntimeError, match=message):
            backends.set_cpu_capability(name)


def _run(code: str, capability: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(backends.ENV_CPU_CAPABILITY, None)
    if capability is not None:
        env[backends.ENV_CPU_CAPABILITY] = capability
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


# Every C++ CPU op once, on small odd shapes, against the plain-PyTorch reference in float64.
_SMOKE = r"""
import json, torch
import slmfast.functional as F
from slmfast import backends
torch.manual_seed(0)
errors = {}
def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
x, w, r = torch.randn(5, 40), torch.randn(40), torch.randn(5, 40)
errors["rms_norm"] = rel(F.rms_norm(x, w, residual=r, backend="cpu")[0],
                         F.rms_norm(x.double(), w.double(), residual=r.double(), backend="torch")[0])
b = torch.randn(40)
errors["layer_norm"] = rel(F.layer_norm(x, w, b, backend="cpu"),
                           F.layer_norm(x.double(), w.double(), b.double(), backend="torch"))
g, u = torch.randn(3, 37), torch.randn(3, 37)
errors["swiglu"] = rel(F.swiglu(g, u, backend="cpu"), F.swiglu(g.double(), u.double(), backend="torch"))
q, k = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 9, 32)
cos, sin = torch.randn(1, 9, 32).cos(), torch.randn(1, 9, 32).sin()
qo, ko = F.rotary(q, k, cos, sin, backend="cpu")
qr, kr = F.rotary(q.double(), k.double(), cos.double(), sin.double(), backend="torch")
errors["rotary"] = max(rel(qo, qr), rel(ko, kr))
logits, target = torch.randn(7, 301), torch.randint(0, 301, (7,))
errors["cross_entropy"] = rel(F.cross_entropy(logits, target, backend="cpu"),
                              F.cross_entropy(logits.double(), target, backend="torch"))
h, wt = torch.randn(7, 48), torch.randn(301, 48)
errors["linear_cross_entropy"] = rel(F.linear_cross_entropy(h, wt, target, backend="cpu"),
                                     F.linear_cross_entropy(h.double(), wt.double(), target, backend="torch"))
ts = torch.randn(7, 48)
h64, wt64, ts64 = h.double(), wt.double(), ts.double()
errors["distill_loss"] = rel(F.distill_loss(h, wt, ts, wt, backend="cpu"),
                             F.distill_loss(h64, wt64, ts64, wt64, backend="torch"))
q, k, v = torch.randn(2, 4, 33, 40), torch.randn(2, 2, 33, 40), torch.randn(2, 2, 33, 40)
errors["attention"] = rel(F.attention(q, k, v, causal=True, backend="cpu"),
                          F.attention(q.double(), k.double(), v.double(), causal=True, backend="torch"))
print(json.dumps({"chosen": backends.cpu_capabilities()["chosen"], "errors": errors}))
"""


@pytest.mark.parametrize("capability", backends.CPU_CAPABILITIES)
def test_capped_process_runs_every_op_correctly(capability):
    """Issue: a process capped with SLMFAST_CPU_CAPABILITY imports, runs that capability's kernels
    and gets float32-accurate results from every op (relative error against float64 < 1e-5)."""
    caps = _caps()
    if capability not in caps["supported"] or capability not in caps["compiled"]:
        pytest.skip(f"this CPU or build lacks {capability}")
    done = _run(_SMOKE, capability)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["chosen"] == capability
    bad = {op: err for op, err in result["errors"].items() if not err < 1e-5}
    assert not bad, f"{capability}: relative errors {bad}"


def test_capping_to_a_missing_capability_is_a_clear_error():
    call = "import torch, slmfast.functional as F; F.rms_norm(torch.randn(2, 8), torch.ones(8))"
    done = _run(call, "avx3")
    assert done.returncode != 0
    assert "SLMFAST_CPU_CAPABILITY must be one of default, avx2, avx512, got 'avx3'" in done.stderr
    missing = [c for c in backends.CPU_CAPABILITIES if c not in _caps()["supported"]]
    for name in missing:
        done = _run(call, name)
        assert f"asks for the {name} kernels, but this CPU supports only" in done.stderr


def test_info_json_reports_the_cpu_capabilities():
    done = _run("import sys; from slmfast.cli import main; sys.exit(main(['info', '--json']))", "default")
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    assert info["cpu"]["chosen"] == "default"
    assert info["cpu"]["compiled"] == _caps()["compiled"]
    assert info["cpu"]["supported"] == _caps()["supported"]


def test_nothing_outside_the_kernels_uses_avx():
    """The library runs on any x86-64 CPU: only the per-capability kernels contain AVX code."""
    if not X86:
        pytest.skip("x86-64 only")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "isa_check.py")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "no AVX instruction" in done.stdout or "nothing checked" in done.stdout
