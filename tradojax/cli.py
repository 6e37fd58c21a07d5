"""The `tradojax` command line: one subcommand per job, each living beside the code it drives.

Each entry names `module:function`; the function takes the remaining argv and returns an exit code.
Handlers are imported lazily so that `tradojax --help` stays instant. Every handler starts with
`tradojax.bootstrap` and runs through `bootstrap.run_command`: a user error exits with code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tradojax.demo:main", "train a tiny block-diffusion model end to end on CPU"),
    "sample": ("tradojax.sampling.commands:sample_main", "sample from a model with the block-diffusion sampler"),
    "trace-view": ("tradojax.sampling.commands:trace_view_main", "write an HTML page replaying a decode trace"),
    "eval": ("tradojax.evaluation:main", "evaluate a model on a task set over a sampling sweep"),
    "sft": ("tradojax.sft.commands:sft_main", "SFT: block, trace, semi-AR, random masking; block-size adaptation"),
    "rl": ("tradojax.rl.commands:rl_main", "RL: TraceRL (optionally with a value model), random masking, coupled"),
    "import-hf": ("tradojax.models.commands:import_hf_main", "read a Hugging Face checkpoint directory"),
    "export-hf": ("tradojax.models.commands:export_hf_main", "write a model or run in Hugging Face form"),
    "data": ("tradojax.data.prepare:data_main", "data prepare NAME --from FILE --out FILE: a downloaded benchmark -> task JSON"),
    "aot": ("tradojax.aot:main", "compile a config's rl/eval programs for its TPU slices on this host; print memory"),
}

USAGE = "usage: tradojax COMMAND [args]   (tradojax COMMAND --help for a command's options)\n\ncommands:\n"


def _quiet_tpu_probe() -> None:
    # With libtpu installed (for AOT compiles) but no TPU attached, jax would probe for one on
    # every start; a TPU VM sets TPU_* itself, and JAX_PLATFORMS given by the user always wins.
    accelerator_files = ("/dev/accel0", "/dev/vfio", "/dev/nvidia0", "/dev/nvidiactl")
    if "JAX_PLATFORMS" not in os.environ and not any(os.path.exists(f) for f in accelerator_files):
        os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE + "".join(f"  {name:<12} {help_}\n" for name, (_, help_) in COMMANDS.items()))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"tradojax: unknown command {name!r}; known: {', '.join(COMMANDS)}\n")
        return 2
    _quiet_tpu_probe()
    # imported here, not at the top: it imports jax, which must not load before the platform is chosen
    from tradojax.bootstrap import run_command

    module_name, function_name = COMMANDS[name][0].split(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    return run_command(name, handler, rest)


if __name__ == "__main__":
    sys.exit(main())
