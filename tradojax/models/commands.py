"""`tradojax import-hf` and `tradojax export-hf`: Hugging Face checkpoints <-> native checkpoints.

    tradojax import-hf HF_DIR --out CKPT_DIR [--dtype bfloat16|float32]
    tradojax export-hf MODEL HF_DIR [--step N] [--tokenizer TOKENIZER_DIR] [--dtype ...] [--max-shard-size 5GB]

export-hf reads any model source (models/loading.py): a training run (`tradojax rl|sft --workdir`
directory, newest intact step or `--step N`; its value model goes to HF_DIR/value/), a params
checkpoint from import-hf, or a Hugging Face directory. Both place the parameters sharded over all
local devices (an `fsdp` mesh), so a model larger than one device's memory converts as long as the
devices together hold it. Bad input (a missing or damaged checkpoint, a full output directory)
exits with code 2 and a message naming the file (`tradojax.bootstrap.run_command`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from flax import nnx

from tradojax.bootstrap import initialize_from_environment_checked, local_fsdp_mesh, say
from tradojax.checkpoint import CheckpointError
from tradojax.models.hf import load_hf_model
from tradojax.models.loading import export_model, load_model
from tradojax.models.native import save_params_checkpoint

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def import_hf_main(argv: list[str]) -> int:
    """`tradojax import-hf HF_DIR --out CKPT_DIR`: a Hugging Face directory -> a native checkpoint."""
    parser = argparse.ArgumentParser(prog="tradojax import-hf", description=import_hf_main.__doc__)
    parser.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="native checkpoint directory to create")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="parameter dtype (default: config.json's torch_dtype)")
    args = parser.parse_args(argv)
    initialize_from_environment_checked()
    model, config = load_hf_model(args.hf_dir, mesh=local_fsdp_mesh(), dtype=args.dtype)
    out = save_params_checkpoint(args.out, config, nnx.state(model, nnx.Param))
    say(f"imported {args.hf_dir} -> {out}\n"
        f"  family {config.family}, {config.num_params():,} parameters, dtype {config.param_dtype}\n"
        f"  {config.num_layers} layers, hidden {config.hidden_size}, heads {config.num_heads}/"
        f"{config.num_kv_heads} (head_dim {config.head_dim}), mlp {config.intermediate_size}, "
        f"vocab {config.vocab_size}, block_size {config.block_size}, mask id {config.mask_token_id}")
    return 0


def run_tokenizer(name: str | None):
    """What to write beside a run's export for its config's `tokenizer`: a directory's files, or
    the built-in tokenizer it names; None when the run named none."""
    if name is None:
        return None
    if name in ("tiny", "qwen3"):
        from tradojax.data.tokenizer import tokenizer_from_name  # imports transformers: only when needed

        return tokenizer_from_name(name)
    return name if Path(name).is_dir() else None


def export_hf_main(argv: list[str]) -> int:
    """`tradojax export-hf MODEL HF_DIR`: a training run, params checkpoint or HF directory -> HF form."""
    parser = argparse.ArgumentParser(prog="tradojax export-hf", description=export_hf_main.__doc__)
    parser.add_argument("checkpoint", metavar="MODEL",
                        help="a training run directory (or its checkpoints/<step>/ folder), a params checkpoint "
                             "from import-hf, or a Hugging Face directory")
    parser.add_argument("out_dir", help="Hugging Face directory to write")
    parser.add_argument("--step", type=int, default=None,
                        help="the training step to export (default: the newest intact one)")
    parser.add_argument("--no-value", action="store_true", help="leave out a run's value model")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory whose files are copied along (default: a run's own tokenizer)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the written tensors (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # before reading the model
        raise CheckpointError(f"{out}: directory exists and is not empty (pass --overwrite)")
    initialize_from_environment_checked()
    loaded = load_model(args.checkpoint, step=args.step, mesh=local_fsdp_mesh(), with_value=not args.no_value,
                        log=lambda line: sys.stderr.write(line + "\n"))
    tokenizer = args.tokenizer if args.tokenizer is not None else run_tokenizer(loaded.tokenizer)
    out = export_model(loaded.policy, out, value=loaded.value, tokenizer=tokenizer,
                       max_shard_bytes=args.max_shard_size, dtype=args.dtype, overwrite=args.overwrite)
    config = loaded.policy.config
    say(f"exported {loaded.source} -> {out}\n"
        f"  family {config.family}, {config.num_params():,} parameters, dtype {args.dtype or config.param_dtype}"
        + (f"\n  value model -> {out / 'value'}" if loaded.value is not None else ""))
    return 0
