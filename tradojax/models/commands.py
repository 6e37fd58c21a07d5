"""`tradojax import-hf` and `tradojax export-hf`: Hugging Face checkpoints <-> native checkpoints.

    tradojax import-hf HF_DIR --out CKPT_DIR [--dtype bfloat16|float32]
    tradojax export-hf CKPT_DIR HF_DIR [--tokenizer TOKENIZER_DIR] [--dtype ...] [--max-shard-size 5GB]

Both place the parameters sharded over all local devices (an `fsdp` mesh), so a model larger than
one device's memory converts as long as the devices together hold it.
"""

from __future__ import annotations

import argparse
import re
import sys

from tradojax.config import ConfigError, MeshConfig

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _fsdp_mesh():
    from tradojax.parallel.mesh import make_mesh

    return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))


def _say(text: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(text)


def _run(prog: str, parser: argparse.ArgumentParser, argv: list[str], body) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage error / help
        return int(exit_.code or 0)
    from tradojax.models.hf import CheckpointError

    try:
        return body(args)
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        sys.stderr.write(f"tradojax {prog}: error: {err}\n")
        return 1


def import_hf_main(argv: list[str]) -> int:
    """`tradojax import-hf HF_DIR --out CKPT_DIR`: a Hugging Face directory -> a native checkpoint."""
    parser = argparse.ArgumentParser(prog="tradojax import-hf", description=import_hf_main.__doc__)
    parser.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="native checkpoint directory to create")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="parameter dtype (default: config.json's torch_dtype)")

    def body(args) -> int:
        from flax import nnx

        from tradojax.models.hf import load_hf_model, save_params_checkpoint

        model, config = load_hf_model(args.hf_dir, mesh=_fsdp_mesh(), dtype=args.dtype)
        out = save_params_checkpoint(args.out, config, nnx.state(model, nnx.Param))
        _say(f"imported {args.hf_dir} -> {out}\n"
              f"  family {config.family}, {config.num_params():,} parameters, dtype {config.param_dtype}\n"
              f"  {config.num_layers} layers, hidden {config.hidden_size}, heads {config.num_heads}/"
              f"{config.num_kv_heads} (head_dim {config.head_dim}), mlp {config.intermediate_size}, "
              f"vocab {config.vocab_size}, block_size {config.block_size}, mask id {config.mask_token_id}")
        return 0

    return _run("import-hf", parser, argv, body)


def export_hf_main(argv: list[str]) -> int:
    """`tradojax export-hf CKPT_DIR HF_DIR`: a native checkpoint -> a Hugging Face directory."""
    parser = argparse.ArgumentParser(prog="tradojax export-hf", description=export_hf_main.__doc__)
    parser.add_argument("checkpoint", help="native checkpoint directory (from import-hf or training)")
    parser.add_argument("out_dir", help="Hugging Face directory to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory whose files are copied along")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the written tensors (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")

    def body(args) -> int:
        from tradojax.models.hf import load_params_checkpoint, save_hf_model

        config, params = load_params_checkpoint(args.checkpoint, mesh=_fsdp_mesh())
        out = save_hf_model((config, params), args.out_dir, tokenizer=args.tokenizer,
                            max_shard_bytes=args.max_shard_size, dtype=args.dtype, overwrite=args.overwrite)
        _say(f"exported {args.checkpoint} -> {out}\n"
              f"  family {config.family}, {config.num_params():,} parameters, "
              f"dtype {args.dtype or config.param_dtype}")
        return 0

    return _run("export-hf", parser, argv, body)
