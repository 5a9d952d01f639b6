"""Which kernel backends exist on this machine, and which one runs a given call.

Four backends implement every op with one meaning (docs/architecture.md §3, §4):
  cuda    hand-written CUDA kernels in slmfast._C (built when torch has CUDA and nvcc was found)
  triton  Triton kernels in slmfast/triton/ (on a GPU, or on the CPU under TRITON_INTERPRET=1)
  cpu     C++ kernels in slmfast._C (at::parallel_for + at::vec)
  torch   the plain-PyTorch reference in slmfast/ops/<op>.py, always available

The choice per call is cuda > triton > cpu > torch among the backends that are available, that
the op implements and that run tensors on the inputs' device; on CUDA tensors, for the ops that
state their kind of call, the GPU dispatch table decides instead (slmfast/gpu_table.py: a kernel
only where a recorded GPU run showed it correct and faster than torch's own path). The Triton
interpreter runs CPU tensors but is a testing tool (hundreds of times slower than the C++
kernels), so on CPU tensors triton is used only when asked for by name. A call chooses with
`backend=...`; the environment variable SLMFAST_BACKEND sets a preference for every call.
Asking for a backend that is not available raises an error that says why. SLMFAST_STRICT=1
turns every silent fallback (a fast path that cannot take some argument) into an error.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

ORDER = ("cuda", "triton", "cpu", "torch")
ENV_BACKEND = "SLMFAST_BACKEND"
ENV_STRICT = "SLMFAST_STRICT"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on when available


@functools.cache
def extension():
    """The compiled module slmfast._C, or None; importing it registers the C++ ops."""
    try:
        return importlib.import_module("slmfast._C")
    except ImportError:
        return None


@functools.cache
def extension_error() -> str:
    try:
        importlib.import_module("slmfast._C")
    except ImportError as exc:
        return (f"the extension slmfast._C is not built or does not load ({exc}); "
                "build it with `make install` or `pip install -e . --no-build-isolation`")
    return ""


def build_info() -> dict:
    """What slmfast._C was compiled with (empty when it is not built)."""
    ext = extension()
    return dict(ext.build_info()) if ext is not None else {}


CPU_CAPABILITIES = ("default", "avx2", "avx512")  # lowest to highest
ENV_CPU_CAPABILITY = "SLMFAST_CPU_CAPABILITY"


def cpu_capabilities() -> dict:
    """The vector ISAs of the C++ CPU kernels: {"compiled": [...], "supported": [...], "chosen": str}.

    slmfast._C holds every CPU kernel once per capability it was compiled for; at run time it
    picks the best one this CPU supports, capped by SLMFAST_CPU_CAPABILITY (read at the first
    kernel call) or by set_cpu_capability(). Lists go from lowest to highest. Empty lists and
    chosen None when the extension is not built.
    """
    ext = extension()
    if ext is None:
        return {"compiled": [], "supported": [], "chosen": None}
    return dict(ext.cpu_capability_info())


def set_cpu_capability(name: str) -> str:
    """Run the C++ CPU kernels with the `name` vector path from now on (one of CPU_CAPABILITIES;
    it must be compiled and supported by this CPU, else ValueError). Returns the previous choice."""
    ext = extension()
    if ext is None:
        raise RuntimeError(extension_error())
    if name not in CPU_CAPABILITIES:
        raise ValueError(f"cpu capability must be one of {', '.join(CPU_CAPABILITIES)}, got {name!r}")
    return ext.set_cpu_capability(name)


@contextlib.contextmanager
def use_cpu_capability(name: str):
    """with use_cpu_capability("avx2"): ... runs the C++ CPU kernels on their AVX2 path (tests)."""
    previous = set_cpu_capability(name)
    try:
        yield
    finally:
        set_cpu_capability(previous)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def strict() -> bool:
    return os.environ.get(ENV_STRICT, "0") not in ("", "0")


def status(name: str) -> BackendStatus:
    """Whether backend `name` can run here, and why not."""
    if name == "torch":
        return BackendStatus("torch", True, "plain PyTorch reference")
    if name == "cpu":
        if extension() is None:
            return BackendStatus("cpu", False, extension_error())
        info = build_info()
        threads = "OpenMP" if info.get("openmp") else "no OpenMP: one thread"
        try:
            caps = cpu_capabilities()
        except RuntimeError as exc:
            # SLMFAST_CPU_CAPABILITY asks for what this CPU or build lacks: the backend stays
            # chosen, so that every call raises this error instead of silently running elsewhere.
            return BackendStatus("cpu", True, f"C++ kernels, unusable: {exc}")
        return BackendStatus("cpu", True, f"C++ kernels ({caps['chosen']} of {'/'.join(caps['compiled'])}, "
                             f"{threads})")
    if name == "cuda":
        if extension() is None:
            return BackendStatus("cuda", False, extension_error())
        if not build_info().get("cuda"):
            return BackendStatus("cuda", False, "slmfast._C was built without the CUDA part "
                                 "(torch without CUDA or nvcc not found at build time)")
        if not torch.cuda.is_available():
            return BackendStatus("cuda", False, "no CUDA GPU is visible to torch")
        return BackendStatus("cuda", True, f"CUDA kernels ({build_info().get('cuda_archs')})")
    if name == "triton":
        version = triton_version()
        if version is None:
            return BackendStatus("triton", False, "triton is not installed (pip install 'slmfast[triton]')")
        if torch.cuda.is_available():
            return BackendStatus("triton", True, f"triton {version} on the GPU")
        if triton_interpreting():
            return BackendStatus("triton", True, f"triton {version} interpreter (TRITON_INTERPRET=1), "
                                 "CPU tensors, for testing")
        return BackendStatus("triton", False, "no CUDA GPU is visible to torch and TRITON_INTERPRET=1 "
                             "is not set")
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(ORDER)}")


def all_status() -> list[BackendStatus]:
    return [status(name) for name in ORDER]


def runs_on(name: str, device: torch.device) -> bool:
    """Whether backend `name` takes tensors on `device` at all."""
    if name == "torch":
        return True
    if name == "cpu":
        return device.type in ("cpu", "meta")  # meta: the fake (shape-only) kernels, for memory plans
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return False


def _automatic(op: str, implemented: tuple[str, ...], device: torch.device, kind: dict | None = None) -> str:
    # A CUDA call that states its kind (slmfast.gpu_table.select) follows the GPU dispatch table:
    # a measured kernel, or "native" (torch's own path). Without a kind: the fixed order below.
    if kind is not None and device.type == "cuda":
        from slmfast import gpu_table  # imported here: gpu_table imports this module
        return gpu_table.automatic(op, implemented, device, kind)
    for name in ORDER:
        if name not in implemented or not runs_on(name, device):
            continue
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is only used when asked for by name
        if status(name).available:
            return name
    return "torch"


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


# The backend choice is made when torch.compile traces a call, not re-made inside the graph.
@torch.compiler.assume_constant_result
def select(op: str, implemented: tuple[str, ...], device: torch.device,
           backend: str | None = None) -> str:
    """The backend that runs this call of `op` on tensors on `device`.

    `backend` (per call) must be available, implemented by the op and able to take tensors on
    `device`, or this raises. A SLMFAST_BACKEND preference that the op cannot honour falls back
    to the automatic choice with a one-time warning (an error under SLMFAST_STRICT=1).
    """
    explicit = backend is not None and backend != "auto"
    requested = backend if explicit else os.environ.get(ENV_BACKEND, "auto") or "auto"
    if requested == "auto":
        return _automatic(op, implemented, device)
    if requested not in ORDER:
        source = "backend" if explicit else ENV_BACKEND
        raise ValueError(f"{op}: {source}={requested!r} is not a backend; expected one of "
                         f"{', '.join(ORDER)} or 'auto'")
    state = status(requested)
    if not state.available:
        raise RuntimeError(f"{op}: backend {requested!r} is not available here: {state.reason}")
    problem = None
    if requested not in implemented:
        problem = f"{op} has no {requested!r} backend (it has {', '.join(implemented)})"
    elif not runs_on(requested, device):
        problem = f"{op}: backend {requested!r} cannot run tensors on {device}"
    if problem is None:
        return requested
    if explicit or strict():
        raise ValueError(problem)
    chosen = _automatic(op, implemented, device)
    warn_once(f"{problem}; {ENV_BACKEND}={requested} ignored for it, using {chosen!r}")
    return chosen


@torch.compiler.assume_constant_result
def fallback(op: str, backend: str, why: str, implemented: tuple[str, ...],
             device: torch.device) -> str:
    """A fast path cannot take some argument of this call: warn once and use the automatic
    choice among the other backends, or raise under SLMFAST_STRICT=1."""
    others = tuple(name for name in implemented if name != backend)
    chosen = _automatic(op, others, device)
    message = f"{op}: the {backend} backend does not support {why}; falling back to {chosen}"
    if strict():
        raise ValueError(message + f" ({ENV_STRICT}=1 forbids fallbacks)")
    warn_once(message)
    return chosen
