"""What many tests share: the tiny model configs, repository paths that do not depend on the
working directory pytest was started from, the tests' XLA flags, and results built once per session."""

import os
import shutil
from pathlib import Path

from filelock import FileLock

from tradojax.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent

# `tradojax ...` in a fresh interpreter: `[sys.executable, "-c", CLI, *arguments]`.
CLI = "import sys; from tradojax.cli import main; sys.exit(main(sys.argv[1:]))"

# ModelConfig's defaults are the tiny SDAR-style model (vocab 512, 2 layers, hidden 64, 4 heads, 2 KV
# heads; mask 3, EOS = pad = 0): the model of the sampler, RL and HF tests.
TINY_MODEL = ModelConfig()

# Smaller still (vocab 64, hidden 32, 2 heads, 1 KV head): losses checked by hand, learning tests,
# checkpoints.
MICRO_MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)


def config_path(name: str) -> str:
    """A shipped config file (`configs/NAME`) as an absolute path."""
    return str(REPO / "configs" / name)


# XLA:CPU without its LLVM optimisations and with its older loop-fusion emitters: tests compile
# hundreds of small programs and run them on tiny shapes, so compiling is most of their time.
# Measured on tests/test_sampler.py + tests/test_rl_core.py, one after the other: 156 s with XLA's
# defaults, 96 s without the LLVM optimisations, 67 s with the fusion emitters off as well (an RL
# policy update: 3.0 -> 1.0 s to compile). Programs run 2-3x slower, which is why the demo's
# learning run goes to a subprocess with XLA's defaults (test_learning.py).
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                          "--xla_cpu_use_fusion_emitters=false")


def build_once(tmp_path_factory, name: str, build) -> Path:
    """`build(directory)` once per test session, shared by every xdist worker: the first worker to
    ask builds under a file lock, the others wait and reuse it. Returns the directory."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's basetemp is a folder of the session's shared one
    directory, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # what a crashed earlier build left
            directory.mkdir()
            build(directory)
            done.touch()
    return directory
