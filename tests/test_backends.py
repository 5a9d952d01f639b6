"""Backend detection and per-call selection (slmfast/backends.py)."""

import warnings

import pytest
import torch

from slmfast import backends

CPU = torch.device("cpu")


def test_torch_is_always_available():
    assert backends.status("torch").available


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="'fast' is not a backend; expected one of cuda, triton, cpu, torch"):
        backends.select("rms_norm", ("cpu", "torch"), CPU, "fast")


def test_unavailable_backend_names_the_reason():
    state = backends.status("cuda")
    if state.available:
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available here: " + state.reason[:20]):
        backends.select("rms_norm", ("cuda", "torch"), CPU, "cuda")


def test_cpu_tensors_choose_cpu_then_torch():
    expected = "cpu" if backends.status("cpu").available else "torch"
    assert backends.select("rms_norm", ("cuda", "triton", "cpu", "torch"), CPU) == expected
    assert backends.select("only_torch", ("torch",), CPU) == "torch"


def test_interpreter_is_used_only_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not backends.status("triton").available:
        pytest.skip("triton not installed")
    assert backends.select("op", ("triton", "torch"), CPU) == "torch"
    assert backends.select("op", ("triton", "torch"), CPU, "triton") == "triton"


def test_explicit_backend_the_op_lacks_raises():
    with pytest.raises(ValueError, match="op has no 'cpu' backend"):
        backends.select("op", ("torch",), CPU, "cpu")


def test_explicit_backend_on_wrong_device_raises():
    if not backends.status("cpu").available:
        pytest.skip("cpu backend not built")
    with pytest.raises(ValueError, match="backend 'cpu' cannot run tensors on cuda"):
        backends.select("op", ("cpu", "torch"), torch.device("cuda"), "cpu")
    # meta tensors take the C++ ops' shape-only kernels (slmfast memory counts bytes with them)
    assert backends.select("op", ("cpu", "torch"), torch.device("meta"), "cpu") == "cpu"


def test_environment_preference(monkeypatch):
    monkeypatch.setenv(backends.ENV_BACKEND, "torch")
    assert backends.select("op", ("cpu", "torch"), CPU) == "torch"
    # a preference the op cannot honour falls back with a warning ...
    monkeypatch.setenv(backends.ENV_BACKEND, "cpu")
    if not backends.status("cpu").available:
        pytest.skip("cpu backend not built")
    with pytest.warns(UserWarning, match="SLMFAST_BACKEND=cpu ignored"):
        assert backends.select("torch_only_op_for_env_test", ("torch",), CPU) == "torch"
    # ... or raises in strict mode
    monkeypatch.setenv(backends.ENV_STRICT, "1")
    with pytest.raises(ValueError, match="has no 'cpu' backend"):
        backends.select("torch_only_op_for_env_test_2", ("torch",), CPU)


def test_environment_typo_is_an_error(monkeypatch):
    monkeypatch.setenv(backends.ENV_BACKEND, "cpp")
    with pytest.raises(ValueError, match="SLMFAST_BACKEND='cpp' is not a backend"):
        backends.select("op", ("cpu", "torch"), CPU)


def test_fallback_warns_once_or_raises_when_strict(monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.fallback("op_fb", "triton", "float64", ("triton", "torch"), CPU) == "torch"
        assert backends.fallback("op_fb", "triton", "float64", ("triton", "torch"), CPU) == "torch"
    assert len([w for w in caught if "does not support float64" in str(w.message)]) == 1
    monkeypatch.setenv(backends.ENV_STRICT, "1")
    with pytest.raises(ValueError, match="SLMFAST_STRICT=1 forbids fallbacks"):
        backends.fallback("op_fb", "triton", "float64", ("triton", "torch"), CPU)


def test_build_info_reports_what_was_compiled():
    if backends.extension() is None:
        pytest.skip("extension not built")
    info = backends.build_info()
    assert set(info) >= {"version", "cuda", "cuda_archs", "openmp", "compiler", "torch"}
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cuda"] == (backends.status("cuda").reason != "slmfast._C was built without the CUDA "
                            "part (torch without CUDA or nvcc not found at build time)")
