"""A C++ argument check in slmfast._C reaches Python as an exception, never as an abort.

Each case runs in a fresh Python process, so that an abort of the process (as seen once with a
_C built on the GPU image: a C++ exception thrown by the extension ended in std::terminate) shows
as one failed test with its signal, not as a crashed test run. The ops are called through
torch.ops.slmfast directly, past the Python checks of slmfast/ops/, so that the C++ checks
(csrc/common/*_args.h) are what refuses the call. The CPU case runs everywhere the extension is
built; the CUDA case is marked gpu (benchmarks/gpu_check.sh runs it right after the build).
"""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slmfast import backends

ROOT = Path(__file__).resolve().parent.parent

# Each snippet calls C++ ops with bad arguments and prints one line per call that raised as it
# should; the test checks those lines and the exit status.
_PRELUDE = """
import torch
import slmfast.functional  # registers the ops of slmfast._C
ops = torch.ops.slmfast

def expect(name, exc_type, fn, words):
    try:
        fn()
    except exc_type as exc:
        message = str(exc)
        missing = [w for w in words if w not in message]
        print(f"RAISED {name} {type(exc).__name__}" + (f" MISSING {missing}" if missing else ""), flush=True)
        return
    print(f"NO ERROR {name}", flush=True)
"""

_CPU_CASES = """
x = torch.randn(4, 8)
expect("rms_norm-weight-shape", RuntimeError,
       lambda: ops.rms_norm_fwd(x, torch.ones(7), None, 1e-6, 0.0), ["rms_norm", "weight"])
expect("glu-dtype", RuntimeError,
       lambda: ops.glu_fwd(torch.ones(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32), "silu"),
       ["glu"])
expect("cross_entropy-target-shape", RuntimeError,
       lambda: ops.cross_entropy_fwd(x, torch.zeros(3, dtype=torch.long), -100, 0.0, 0.0, 0.0), ["target"])
"""

_CUDA_CASES = """
x = torch.randn(4, 8, device="cuda")
expect("cuda-rms_norm-weight-shape", RuntimeError,
       lambda: ops.rms_norm_fwd(x, torch.ones(7, device="cuda"), None, 1e-6, 0.0), ["rms_norm", "weight"])
expect("cuda-rotary-cos-shape", RuntimeError,
       lambda: ops.rotary(torch.randn(1, 2, 5, 8, device="cuda"), torch.randn(1, 2, 5, 8, device="cuda"),
                          torch.randn(4, 8, device="cuda"), torch.randn(4, 8, device="cuda"), False, False),
       ["rotary"])
# What the CUDA attention cannot run raises NotImplementedError, which slmfast/ops/attention.py
# catches to fall back: it must arrive as that Python type.
q = torch.randn(1, 2, 16, 64, device="cuda")  # float32: the CUDA kernels take bf16/fp16
expect("cuda-attention-fp32", NotImplementedError,
       lambda: ops.attention_fwd(q, q, q, 0.125, False, -1, -1, None, None, 0, 0), ["attention_fwd"])
torch.cuda.synchronize()
# the process and the GPU are still usable afterwards
y, _, _ = ops.rms_norm_fwd(x, torch.ones(8, device="cuda"), None, 1e-6, 0.0)
torch.cuda.synchronize()
print("STILL USABLE", bool(torch.isfinite(y).all()), flush=True)
"""


def run_snippet(body: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    code = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def check_output(result: subprocess.CompletedProcess, names: list[str]) -> None:
    lines = result.stdout.splitlines()
    context = (f"{describe_exit(result.returncode)}\nstdout:\n{result.stdout}\n"
               f"stderr (end):\n{result.stderr[-3000:]}")
    assert result.returncode == 0, "the process did not survive the C++ exceptions: " + context
    for name in names:
        raised = [line for line in lines if line.startswith(f"RAISED {name} ")]
        assert raised, f"{name}: no exception reached Python\n{context}"
        assert "MISSING" not in raised[0], f"{name}: the message lacks the argument's name: {raised[0]}"


def test_cpu_op_errors_reach_python():
    if backends.extension() is None:
        pytest.skip(backends.extension_error())
    result = run_snippet(_CPU_CASES)
    check_output(result, ["rms_norm-weight-shape", "glu-dtype", "cross_entropy-target-shape"])


@pytest.mark.gpu
def test_cuda_op_errors_reach_python():
    state = backends.status("cuda")
    if not state.available:
        pytest.skip(state.reason)
    result = run_snippet(_CUDA_CASES)
    check_output(result, ["cuda-rms_norm-weight-shape", "cuda-rotary-cos-shape", "cuda-attention-fp32"])
    assert "STILL USABLE True" in result.stdout, result.stdout
