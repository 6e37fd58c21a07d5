"""Test set-up: CPU only, 8 fake devices for sharding tests (set before jax is imported).

No persistent compilation cache: jaxlib 0.10.2 segfaulted serializing an XLA:CPU executable for it
(`compilation_cache.put_executable_and_time` -> `executable.serialize()`, a suite run of
2026-12-01), which takes down an xdist worker and fails its test."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in tiny BPE tokenizer (a config's `tokenizer: "tiny"`), built once per test session."""
    from tradojax.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()
