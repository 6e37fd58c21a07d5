"""SFT for block-diffusion models (spec section 5): rows from (prompt ids, response ids) pairs.

`block` SFT (the original's `semi-ar`, the default) masks every response position with
probability p_j ~ U(lower_p, upper_p) and trains all blocks at once; `trace` SFT builds rows from
a recorded decode trace exactly as TraceRL does. Training state (params, optimizer, data position,
step) is checkpointed with orbax and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from tradojax.checkpoint import TrainCheckpointer
from tradojax.config import Config, to_dict
from tradojax.models.transformer import Decoder
from tradojax.ops.masks import BlockAlignment
from tradojax.rl.traces import trace_rounds
from tradojax.training.rows import Rows, block_sft_masks, pack_rows, round_up
from tradojax.training.step import make_optimizer, make_train_step, sft_loss


@dataclasses.dataclass(frozen=True)
class SFTPair:
    """Token ids of one SFT example; `trace` (1-based steps per response token) for trace SFT."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    trace: tuple[int, ...] | None = None


def lengths_for(pairs: Sequence[SFTPair], config: Config) -> tuple[int, int]:
    """(L0, L1): the longest prompt and response, rounded up to a multiple of 8 / the block."""
    train = config.train
    longest_prompt = max(len(p.prompt) for p in pairs)
    longest_response = max(len(p.response) for p in pairs)
    if longest_prompt > train.max_prompt_len:
        raise ValueError(f"a prompt of {longest_prompt} tokens exceeds train.max_prompt_len={train.max_prompt_len}")
    if longest_response > train.max_response_len:
        raise ValueError(f"a response of {longest_response} tokens exceeds train.max_response_len="
                         f"{train.max_response_len}")
    return round_up(longest_prompt, 8), round_up(longest_response, train.block_size)


def sft_rows(pairs: Sequence[SFTPair], config: Config, rng: np.random.Generator, *, mode: str = "block",
             prompt_length: int, response_length: int) -> Rows:
    """Training rows of a batch of pairs (`mode` "block" or "trace")."""
    train = config.train
    alignment = BlockAlignment(train.block_alignment)
    prompts, responses, noisy, trained = [], [], [], []
    if mode == "block":
        noisy, trained = block_sft_masks([len(p.response) for p in pairs], response_length, rng,
                                         train.lower_p, train.upper_p, train.post_num)
        prompts = [np.asarray(p.prompt) for p in pairs]
        responses = [np.asarray(p.response) for p in pairs]
    elif mode == "trace":
        for pair in pairs:
            trace = np.asarray(pair.trace if pair.trace is not None else np.arange(1, len(pair.response) + 1))
            for row in trace_rounds(trace, len(pair.response), response_length=response_length,
                                    prompt_length=len(pair.prompt), block_size=train.block_size,
                                    post_num=train.post_num, alignment=alignment):
                prompts.append(np.asarray(pair.prompt))
                responses.append(np.asarray(pair.response))
                noisy.append(row.noisy)
                trained.append(row.trained)
    else:
        raise ValueError(f"SFT mode must be 'block' or 'trace', got {mode!r}")
    return pack_rows(prompts, responses, noisy, trained, prompt_length=prompt_length,
                     response_length=response_length, pad_id=config.model.pad_token_id,
                     mask_id=config.model.mask_token_id, block_size=train.block_size, alignment=alignment)


class SFTTrainer:
    """`config.train.steps` updates of `config.train.batch_size` rows, drawn by a seeded shuffle."""

    def __init__(self, config: Config, policy: Decoder, pairs: Sequence[SFTPair], *, workdir: str | Path,
                 mode: str = "block", held_out: Sequence[SFTPair] = (), log: Callable[[str], None] = print):
        if not pairs:
            raise ValueError("SFT needs at least one example")
        self.config = config
        self.pairs = list(pairs)
        self.held_out = list(held_out)
        self.mode = mode
        self.workdir = Path(workdir)
        self.log = log
        self.prompt_length, self.response_length = lengths_for(self.pairs + self.held_out, config)
        self.graphdef, self.params = nnx.split(policy)
        self.tx = make_optimizer(config.train)
        self.opt_state = self.tx.init(self.params)
        self.step_fn = make_train_step(self.graphdef, self.tx, sft_loss, config.train.num_micro_batches)
        self.step = 0
        self.history: list[dict] = []
        self.checkpointer = TrainCheckpointer(self.workdir / "checkpoints")

    def batch_indices(self, step: int) -> np.ndarray:
        """Epoch-wise seeded permutations: a pure function of (seed, step), so resumes are exact."""
        n, b = len(self.pairs), self.config.train.batch_size
        start = step * b
        out = []
        while len(out) < b:
            epoch, offset = divmod(start + len(out), n)
            permutation = np.random.default_rng([self.config.experiment.seed, epoch]).permutation(n)
            take = min(b - len(out), n - offset)
            out.extend(permutation[offset:offset + take].tolist())
        return np.asarray(out)

    def rows_for(self, pairs: Sequence[SFTPair], rng: np.random.Generator) -> Rows:
        return sft_rows(pairs, self.config, rng, mode=self.mode, prompt_length=self.prompt_length,
                        response_length=self.response_length)

    def held_out_loss(self) -> float:
        """Mean SFT loss on the held-out pairs under fixed masks (seed 0)."""
        rows = self.rows_for(self.held_out, np.random.default_rng(0))
        return float(_eval_loss(self.graphdef, self.params, rows))

    def policy(self) -> Decoder:
        return nnx.merge(self.graphdef, self.params)

    def save(self) -> None:
        meta = {"step": self.step, "history": self.history, "config": to_dict(self.config), "mode": self.mode}
        self.checkpointer.save(self.step, {"policy": self.params, "policy_opt": self.opt_state}, meta)

    def restore(self) -> bool:
        if self.checkpointer.latest_step() is None:
            return False
        step, meta = self.checkpointer.restore_meta()
        trees = self.checkpointer.restore(step, {"policy": self.params, "policy_opt": self.opt_state})
        self.params, self.opt_state = trees["policy"], trees["policy_opt"]
        self.step, self.history = int(meta["step"]), list(meta["history"])
        self.log(f"resumed SFT from {self.checkpointer.directory}/{step}")
        return True

    def run(self, *, resume: bool = False, save_every: int = 0, eval_every: int = 0,
            on_step: Callable[[dict], None] | None = None) -> list[dict]:
        if resume:
            self.restore()
        total = self.config.train.steps
        with open(self.workdir / "sft_metrics.jsonl", "a") as log_file:
            while self.step < total:
                start = time.perf_counter()
                rng = np.random.default_rng([self.config.experiment.seed, self.step, 0x5F7])
                rows = self.rows_for([self.pairs[i] for i in self.batch_indices(self.step)], rng)
                self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, rows)
                self.step += 1
                record = {"step": self.step, "loss": float(metrics["loss"]),
                          "nll_per_token": float(metrics["nll_per_token"]),
                          "grad_norm": float(metrics["grad_norm"]), "step_s": time.perf_counter() - start}
                if self.held_out and eval_every and (self.step % eval_every == 0 or self.step == total):
                    record["held_out_loss"] = self.held_out_loss()
                self.history.append(record)
                log_file.write(json.dumps(record) + "\n")
                if on_step is not None:
                    on_step(record)
                if save_every and (self.step % save_every == 0 or self.step == total):
                    self.save()
        return self.history


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_loss(graphdef, params, rows: Rows) -> jax.Array:
    return sft_loss(nnx.merge(graphdef, params), rows, None)[0]
