"""What every `tradojax` command does before its own work, done one way.

`bootstrap(argv, parser)` reads the command line (`--config FILE`, its `--config.a.b=v` overrides
and the command's own flags), loads the config, joins a multi-host job (before any device use),
loads the tokenizer (refusing one without mask/EOS tokens) and builds the config's mesh. Commands
without a config (`import-hf`, `export-hf`, `data`) use the pieces they need.

User errors (a bad config, file, data, checkpoint, tokenizer or flag) are exceptions of the types
in `user_errors()`; `run_command` (what `tradojax.cli` calls) prints them as
`tradojax NAME: Type: message` on stderr and returns exit code 2, without a traceback; argparse's
own exits keep their codes (2 for a usage error, 0 for --help).

No model code here (it sits beside config and data): a command loads its model itself and checks
it against the tokenizer with `check_tokenizer_matches`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from tradojax.checkpoint import CheckpointError
from tradojax.config import Config, ConfigError, MeshConfig, load_config, split_config_args
from tradojax.data.readers import DataFormatError
from tradojax.parallel.distributed import initialize_from_environment
from tradojax.parallel.mesh import make_mesh


class CommandError(ValueError):
    """A user-facing problem with a command's arguments or input files."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, not a bug: printed without a traceback, exit 2."""
    # OSError: a path that is not a directory, is not writable, a full disk (the message names the path)
    errors: list[type[BaseException]] = [ConfigError, DataFormatError, CheckpointError, CommandError, OSError]
    tokenizers = sys.modules.get("tradojax.data.tokenizer")  # transformers is slow to import: only once used
    if tokenizers is not None:
        errors.append(tokenizers.TokenizerError)
    return tuple(errors)


def run_command(name: str, handler: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """handler(argv)'s exit code; 2 with a one-line message for a user error."""
    try:
        return int(handler(argv) or 0)
    except SystemExit as exit_:  # argparse: a usage error (its message printed) or --help
        return exit_.code if isinstance(exit_.code, int) else 2
    except user_errors() as err:  # bad input: a clear message naming the field/file, no traceback
        sys.stderr.write(f"tradojax {name}: {type(err).__name__}: {err}\n")
        return 2


@dataclasses.dataclass(frozen=True)
class Setup:
    """A command's start: its config and flags, and (where asked for) tokenizer and mesh."""

    config: Config
    args: argparse.Namespace
    config_path: str | None
    overrides: list[str]
    tokenizer: Any = None
    special_ids: dict[str, int] | None = None
    mesh: Mesh | None = None


def bootstrap(argv: Sequence[str], parser: argparse.ArgumentParser, *,
              check: Callable[[argparse.Namespace, list[str]], None] | None = None,
              default_config: Callable[[list[str]], Config] | None = None,
              tokenizer: bool = True, mesh: bool = True) -> Setup:
    """The command line, the config, the multi-host join, the tokenizer and the mesh, in that order.

    Args:
      check: called with the parsed flags and the override list before the config loads: refuses
        bad flags (`parser.error`, or a CommandError) or turns flags into overrides.
      default_config: makes the config from the overrides when no --config is given (else
        --config is required).
      tokenizer: load `tokenizer_name(config)` and its special ids.
      mesh: build the config's mesh (`make_mesh(config.mesh)`) over all devices.
    """
    config_path, overrides, rest = split_config_args(list(argv))
    args = parser.parse_args(rest)
    if config_path is None and default_config is None:
        parser.error("--config=FILE is required (e.g. --config=configs/tiny.py)")
    if check is not None:
        check(args, overrides)
    config = load_config(config_path, overrides) if config_path is not None else default_config(overrides)
    initialize_from_environment_checked()
    tokenizer_, special_ids = load_tokenizer(config) if tokenizer else (None, None)
    return Setup(config=config, args=args, config_path=config_path, overrides=overrides, tokenizer=tokenizer_,
                 special_ids=special_ids, mesh=make_mesh(config.mesh) if mesh else None)


def initialize_from_environment_checked() -> None:
    """Joins a multi-host job (TPU pod, GPU cluster) when the environment says so; a malformed
    variable is a user error."""
    try:
        initialize_from_environment()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def one_device_or_mesh(mesh: Mesh) -> Mesh | None:
    """None on a single device (the unsharded path), else the mesh."""
    return None if mesh.size == 1 else mesh


def local_fsdp_mesh() -> Mesh:
    """All local devices on the fsdp axis: parameters converted shard by shard (`import-hf`, `export-hf`)."""
    return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def tokenizer_name(config: Config) -> str:
    """`config.tokenizer`; unset: the `hf_checkpoint` directory when it holds a tokenizer, else the
    built-in "tiny" one."""
    if config.tokenizer is not None:
        return config.tokenizer
    checkpoint = Path(config.hf_checkpoint) if config.hf_checkpoint is not None else None
    if checkpoint is not None and any((checkpoint / name).is_file() for name in _TOKENIZER_FILES):
        return str(checkpoint)
    return "tiny"


def load_tokenizer(config: Config) -> tuple[Any, dict[str, int]]:
    """The config's tokenizer and its special ids (`data.tokenizer.special_token_ids`); a missing or
    garbled tokenizer, or one without mask/EOS tokens, is a ConfigError naming `tokenizer`."""
    from tradojax.data import tokenizer as tokenizers  # imports transformers: only for the commands that need it

    try:
        tokenizer = tokenizers.tokenizer_from_name(tokenizer_name(config))
        return tokenizer, tokenizers.special_token_ids(tokenizer)
    except tokenizers.TokenizerError as err:
        raise ConfigError(f"tokenizer: {err}") from None


def check_tokenizer_matches(model_config: Any, tokenizer: Any, ids: dict[str, int]) -> None:
    """The model's mask and EOS ids are the tokenizer's, and its vocabulary holds every token."""
    if ids["mask_id"] != model_config.mask_token_id:
        raise ConfigError(f"model.mask_token_id: {model_config.mask_token_id} but the tokenizer's mask token "
                          f"is {ids['mask_id']}")
    if ids["eos_id"] != model_config.eos_token_id:
        raise ConfigError(f"model.eos_token_id: {model_config.eos_token_id} but the tokenizer's eos token "
                          f"is {ids['eos_id']}")
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(f"model.vocab_size: {model_config.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens")


def say(text: str) -> None:
    """Prints on process 0 only (a multi-host job's other processes stay quiet)."""
    if jax.process_index() == 0:
        print(text)
