"""Test set-up: CPU only, 8 fake devices for sharding tests (set before jax is imported).

No persistent compilation cache: jaxlib 0.10.2 segfaulted serializing an XLA:CPU executable for it
(`compilation_cache.put_executable_and_time` -> `executable.serialize()`, a suite run of
2026-12-01), which takes down an xdist worker and fails its test."""

import os

from helpers import FAST_COMPILE_XLA_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_COMPILE_XLA_FLAGS
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The end-to-end (slow) tests first, the longest (the demo's learning run) first of all: with
    two xdist workers they then overlap the many short tests instead of ending the run alone."""
    def rank(item):
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.nodeid.startswith("tests/test_learning.py") else 1

    items.sort(key=rank)  # stable: the collection order within each rank


# A worker that dies (a signal inside jaxlib; CI saw two, in different tests, after half an hour of
# compiles in one process) gets its test run once more on a fresh worker. A second crash, or any
# ordinary failure, fails as usual. xdist's work-stealing scheduler (pyproject's addopts) can reschedule a test.
_crashed_once: set[str] = set()


def pytest_handlecrashitem(crashitem, report, sched):
    if crashitem in _crashed_once:
        return
    _crashed_once.add(crashitem)
    try:
        sched.mark_test_pending(crashitem)
    except NotImplementedError:  # schedulers that group tests cannot reschedule one
        return
    report.outcome = "rerun"
    report.longrepr = f"{report.longrepr}; rerunning it once on a fresh worker"


def pytest_report_teststatus(report):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in tiny BPE tokenizer (a config's `tokenizer: "tiny"`), built once per test session."""
    from tradojax.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()
