"""`tradojax sample` and `tradojax trace-view`.

    tradojax sample --config configs/tiny.py [--config.sampling.max_new_tokens=64 ...] \\
        --prompt "What is 2+3?" [--prompt ...] [--prompts-file FILE] [--output out.jsonl]
    tradojax trace-view --config configs/tiny.py --prompt "What is 2+3?" --out trace.html
    tradojax trace-view --config configs/tiny.py --from out.jsonl [--row 0] --out trace.html

Weights come from `hf_checkpoint` (a local Hugging Face directory or a tradojax params checkpoint)
or, when it is unset, a random initialisation (said so on stderr). The tokenizer is `tokenizer`
("tiny", "qwen3" or a directory; unset: the checkpoint directory's, else "tiny";
`tradojax.bootstrap.tokenizer_name`). Prompts are user messages rendered with the tokenizer's chat
template unless `--raw`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

from tradojax.bootstrap import CommandError, Setup, bootstrap, check_tokenizer_matches, one_device_or_mesh, user_errors
from tradojax.config import Config
from tradojax.data import readers
from tradojax.data.templates import encode_text, render_user_turn
from tradojax.models.loading import load_policy
from tradojax.sampling.block_diffusion import BlockDiffusionSampler, Progress
from tradojax.sampling.full_diffusion import FullDiffusionSampler
from tradojax.sampling.trace_view import token_pieces, write_trace_page


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _read_text(path: str | Path) -> str:
    try:  # invalid UTF-8 names the line and byte
        return readers.read_utf8_text(path)
    except readers.DataFormatError as err:
        raise CommandError(str(err)) from None


def _parse_json(text: str, file: str, location: str | None = None) -> Any:
    try:  # bad syntax, nesting past the recursion limit, huge integers: named, no traceback
        return readers.parse_json_text(text, file, location)
    except readers.DataFormatError as err:
        raise CommandError(str(err)) from None


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL (objects with "prompt" or "question", or JSON strings), a JSON list
    (of such objects or strings), or plain text with one prompt per line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"prompts file {path} does not exist")
    text = _read_text(path)

    def from_item(item: Any, where: str) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict):
            for key in ("prompt", "question"):
                if isinstance(item.get(key), str):
                    return item[key]
            raise CommandError(f"{where}: object has no string field 'prompt' or 'question' (keys: {sorted(item)})")
        raise CommandError(f"{where}: expected a string or an object, got {type(item).__name__}")

    if path.suffix == ".json":
        items = _parse_json(text, str(path))
        if not isinstance(items, list):
            raise CommandError(f"{path}: expected a JSON list of prompts, got {type(items).__name__}")
        prompts = [from_item(item, f"{path}: item {i}") for i, item in enumerate(items)]
    else:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        is_jsonl = path.suffix == ".jsonl" or (lines and lines[0][1].lstrip().startswith("{"))
        prompts = []
        for number, line in lines:
            if is_jsonl:
                item = _parse_json(line, str(path), f"line {number}")
                prompts.append(from_item(item, f"{path}: line {number}"))
            else:
                prompts.append(line)
    if not prompts:
        raise CommandError(f"prompts file {path} holds no prompts")
    return prompts


def load_model_for(config: Config, mesh: Any = None) -> Any:
    """The Decoder: from `hf_checkpoint` (a Hugging Face directory or a tradojax params checkpoint),
    else randomly initialised from `config.model` (said so on stderr)."""
    if config.hf_checkpoint is None:
        sys.stderr.write(f"note: hf_checkpoint is not set: random weights (seed {config.experiment.seed})\n")
    return load_policy(config, mesh=mesh)


def encode_prompts(tokenizer: Any, texts: list[str], raw: bool) -> list[list[int]]:
    return [list(encode_text(tokenizer, text if raw else render_user_turn(tokenizer, text))) for text in texts]


def _sample(setup: Setup, prompt_texts: list[str], raw: bool, show_progress: bool, seed: int | None):
    """The model (placed on the mesh when there are several devices), checked against the tokenizer,
    and the rollout of the prompts, as numpy arrays."""
    mesh = one_device_or_mesh(setup.mesh)
    model = load_model_for(setup.config, mesh)
    check_tokenizer_matches(model.config, setup.tokenizer, setup.special_ids)
    try:
        prompt_ids = encode_prompts(setup.tokenizer, prompt_texts, raw)
        return prompt_ids, _run_sampler(setup.config, model, prompt_ids, show_progress, seed, mesh).to_numpy()
    except (ValueError, TypeError) as err:  # prompts the sampler refuses (too long for its buckets, ...)
        if isinstance(err, user_errors()):
            raise
        raise CommandError(str(err)) from None


def _run_sampler(config: Config, model: Any, prompt_ids: list[list[int]], show_progress: bool, seed: int | None,
                 mesh: Any = None):
    rng = config.sampling.seed if seed is None else seed
    if model.config.family in ("llada", "dream"):  # full attention: the semi-autoregressive canvas sampler
        return FullDiffusionSampler(model, config.sampling, mesh=mesh).generate(prompt_ids, rng=rng)
    sampler = BlockDiffusionSampler(model, config.sampling, mesh=mesh)
    if not show_progress:
        return sampler.generate(prompt_ids, rng=rng)
    with Bar(TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
             TextColumn("{task.fields[rows]}"), TimeElapsedColumn(), transient=False,
             console=Console(stderr=True)) as bar:
        budget = len(prompt_ids) * config.sampling.num_samples * config.sampling.max_new_tokens
        task = bar.add_task("sampling", total=budget, rows="")

        def update(p: Progress) -> None:
            # rows that stop early leave budget unused: the bar is full once every row is done
            completed = budget if p.rows_done == p.rows_total else p.tokens_generated
            bar.update(task, completed=completed, rows=f"{p.rows_done}/{p.rows_total} rows done, {p.forwards} forwards")

        return sampler.generate(prompt_ids, rng=rng, progress=update,
                                iterations_per_call=config.sampling.denoising_steps + 1)


# ----------------------------------------------------------------------------------------------
# tradojax sample
# ----------------------------------------------------------------------------------------------


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradojax sample",
        description="Sample responses with the block-diffusion sampler (SDAR/TraDo), or the full-attention "
                    "sampler for LLaDA and Dream models. Config: --config FILE and "
                    "--config.section.field=value overrides (e.g. --config.sampling.num_samples=4).")
    parser.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or JSONL/JSON with 'prompt' or 'question'")
    parser.add_argument("--raw", action="store_true", help="send prompts as they are (no chat template)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: sampling.seed)")
    parser.add_argument("--output", help="write one JSON line per response (ids, trace, log-probs, text)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def sample_main(argv: list[str]) -> int:
    """`tradojax sample`: prints every response; returns the exit code."""
    texts: list[str] = []

    def check(args: argparse.Namespace, overrides: list[str]) -> None:
        texts.extend(args.prompt)
        if args.prompts_file:
            texts.extend(read_prompts_file(args.prompts_file))
        if not texts:
            raise CommandError("give --prompt TEXT or --prompts-file FILE")

    setup = bootstrap(argv, _sample_parser(), check=check)
    config, args, tokenizer = setup.config, setup.args, setup.tokenizer
    start = time.perf_counter()
    _, rollout = _sample(setup, texts, args.raw, not args.no_progress, args.seed)
    seconds = time.perf_counter() - start

    records = []
    for row in range(rollout.tokens.shape[0]):
        n = int(rollout.lengths[row])
        token_ids = rollout.tokens[row, :n].tolist()
        index = int(rollout.prompt_index[row])
        record = {
            "prompt": texts[index],
            "prompt_index": index,
            "sample": row % config.sampling.num_samples,
            "response": tokenizer.decode(token_ids, skip_special_tokens=True),
            "token_ids": token_ids,
            "step_map": rollout.trace[row, :n].tolist(),
            "logprobs": [round(float(x), 6) for x in rollout.logprobs[row, :n]],
            "hit_stop": bool(rollout.hit_stop[row]),
            "denoising_steps": int(rollout.num_steps[row]),
        }
        records.append(record)
        header = f"=== prompt {index}" + (f", sample {record['sample']}" if config.sampling.num_samples > 1 else "")
        sys.stdout.write(f"{header} ({n} tokens, {record['denoising_steps']} steps"
                         f"{', stopped' if record['hit_stop'] else ', at max_new_tokens'}) ===\n")
        sys.stdout.write(record["response"] + "\n")
    generated = rollout.num_generated
    sys.stdout.write(f"--- {len(records)} responses, {generated} tokens in {seconds:.2f} s "
                     f"({generated / max(seconds, 1e-9):.1f} tokens/s incl. compile), "
                     f"{rollout.num_forwards} decode forwards\n")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.write(f"wrote {out}\n")
    return 0


# ----------------------------------------------------------------------------------------------
# tradojax trace-view
# ----------------------------------------------------------------------------------------------


def _trace_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradojax trace-view",
        description="Write an HTML page replaying the order in which a response's tokens were unmasked: "
                    "sample one prompt (--prompt) or take a row of a `tradojax sample --output` file (--from).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a user message to sample (uses the config's sampling settings)")
    source.add_argument("--from", dest="from_file", help="a JSONL file written by `tradojax sample --output`")
    parser.add_argument("--row", type=int, default=0, help="which line of --from (0-based)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as it is (no chat template)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: sampling.seed)")
    parser.add_argument("--out", default="trace_viewer.html", help="the HTML file to write")
    return parser


def _record_from_file(path: str, row: int) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"trace file {file} does not exist")
    lines = [(n, line) for n, line in enumerate(_read_text(file).splitlines(), start=1) if line.strip()]
    if not 0 <= row < len(lines):
        raise CommandError(f"{file}: --row {row} is out of range (the file has {len(lines)} records)")
    number, line = lines[row]
    record = _parse_json(line, str(file), f"line {number}")
    if not isinstance(record, dict):
        raise CommandError(f"{file}: line {number}: expected a JSON object, got {type(record).__name__}")
    for key in ("token_ids", "step_map"):
        if not isinstance(record.get(key), list):
            raise CommandError(f"{file}: line {number}: missing list field {key!r}")
    if len(record["token_ids"]) != len(record["step_map"]):
        raise CommandError(f"{file}: line {number}: token_ids and step_map differ in length "
                           f"({len(record['token_ids'])} vs {len(record['step_map'])})")
    return record


def trace_view_main(argv: list[str]) -> int:
    """`tradojax trace-view`: writes the HTML page; returns the exit code."""
    setup = bootstrap(argv, _trace_parser())
    config, args, tokenizer = setup.config, setup.args, setup.tokenizer
    s = config.sampling
    meta = {"block size": s.block_size, "denoising steps": s.denoising_steps, "strategy": s.remasking_strategy}
    if args.from_file:
        record = _record_from_file(args.from_file, args.row)
        token_ids, steps, prompt = record["token_ids"], record["step_map"], str(record.get("prompt", ""))
        meta = {"source": f"{args.from_file} row {args.row}"}
    else:
        single = dataclasses.replace(config, sampling=dataclasses.replace(s, num_samples=1))
        prompt_ids, rollout = _sample(dataclasses.replace(setup, config=single), [args.prompt], args.raw, True,
                                      args.seed)
        n = int(rollout.lengths[0])
        token_ids, steps = rollout.tokens[0, :n].tolist(), rollout.trace[0, :n].tolist()
        prompt = tokenizer.decode(prompt_ids[0], skip_special_tokens=False)
    if not token_ids:
        raise CommandError("the response is empty: nothing to replay")
    pieces, special = token_pieces(tokenizer, token_ids)
    try:
        path = write_trace_page(args.out, pieces, steps, special, prompt=prompt, meta=meta)
    except ValueError as err:  # a --from record whose steps cannot be replayed (e.g. a step < 1)
        raise CommandError(f"{args.from_file or 'the sampled trace'}: {err}") from None
    sys.stdout.write(f"wrote {path} ({len(token_ids)} tokens, {max(steps)} steps)\n")
    return 0
