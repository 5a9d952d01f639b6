"""Test set-up shared by every test.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1); it must be set
before triton decorates any kernel, that is before slmfast is imported. Tests marked `gpu` are
skipped without CUDA (they run on a GPU machine through benchmarks/gpu_check.sh). Every test
gets its own seed (from its node id), so inputs are fresh per test and reproducible;
SLMFAST_TEST_SEED_OFFSET=n (an int, 0 by default) mixes n into every seed, so that a tolerance
test can be rerun on other draws (tools/seed_sweep.py). A test whose params carry the mark
cpu_capability(name) (tests/helpers.py: backend_params) runs the C++ CPU kernels on that vector
path.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from slmfast import backends  # noqa: E402

SEED_OFFSET_ENV = "SLMFAST_TEST_SEED_OFFSET"


def _capability(item) -> str | None:
    """The vector path a test runs the cpu backend on: its cpu_capability(name) mark, or None."""
    for mark in item.iter_markers("cpu_capability"):
        if mark.args:
            return mark.args[0]
    return None


def _lower_capability_deselected(config, items):
    """Tests whose params carry cpu_capability(best_only=True) (tests/helpers.py:
    best_capability_only: shapes where a lower vector path would add minutes and nothing the
    smaller shapes do not test) run on the machine's best path only."""
    from tests.helpers import cpu_capabilities_here
    here = cpu_capabilities_here()
    if len(here) < 2:
        return
    kept, dropped = [], []
    for item in items:
        best_only = any(mark.kwargs.get("best_only") for mark in item.iter_markers("cpu_capability"))
        capability = _capability(item)
        (dropped if best_only and capability not in (None, here[0]) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_collection_modifyitems(config, items):
    _lower_capability_deselected(config, items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def seed_of(nodeid: str) -> int:
    """The seed of a test: a hash of its node id, and of the offset when one is set."""
    offset = int(os.environ.get(SEED_OFFSET_ENV, "0") or 0)
    key = nodeid if offset == 0 else f"{nodeid}#seed-offset={offset}"
    return zlib.crc32(key.encode())


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(seed_of(request.node.nodeid))
    yield


@pytest.fixture(autouse=True)
def _cpu_capability(request):
    """Runs the test on the vector path named by its cpu_capability mark (set back afterwards)."""
    capability = _capability(request.node)
    if capability is None:
        yield
        return
    with backends.use_cpu_capability(capability):
        yield


_passed = 0


def pytest_runtest_logreport(report):
    global _passed
    if report.when == "call" and report.passed:
        _passed += 1


def pytest_sessionfinish(session, exitstatus):
    # A run in which every test was skipped or deselected proves nothing: fail it. Under
    # pytest-xdist only the controller decides (it sees every worker's reports).
    if hasattr(session.config, "workerinput"):
        return
    if exitstatus == 0 and _passed == 0 and not session.config.option.collectonly:
        session.exitstatus = 1
        print("\nno test passed (all skipped or deselected): failing the run")
