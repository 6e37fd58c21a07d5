"""Test set-up: CPU only, 8 fake devices for sharding tests (set before jax is imported), and a
persistent compilation cache so that identical programs compile once per run across tests and
xdist workers."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in tiny BPE tokenizer (a config's `tokenizer: "tiny"`), built once per test session."""
    from tradojax.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()
