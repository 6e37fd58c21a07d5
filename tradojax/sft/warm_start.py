"""The SFT stage before RL (`config.warm_start`): block SFT on the training tasks' worked solutions.

RL learns only from rewards it sees: a model that never answers right gets no signal. The original
starts RL from an instruct checkpoint; a from-scratch tiny model needs this short SFT first. Used by
`tradojax rl` (when the config has a `warm_start` section) and by `tradojax demo`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from tradojax.config import Config, ConfigError
from tradojax.data.readers import MathTask
from tradojax.data.synthetic import synthetic_solution
from tradojax.data.templates import QWEN_END_OF_TURN, encode_text, math_prompt
from tradojax.models.transformer import Decoder
from tradojax.sft.trainer import SFTPair, SFTTrainer


def warm_start_pairs(tokenizer, tasks: Sequence[MathTask]) -> list[SFTPair]:
    """(math prompt, worked solution + end of turn) for each synthetic task."""
    pairs = []
    for task in tasks:
        try:
            solution = synthetic_solution(task)
        except ValueError as err:
            raise ConfigError(f"warm_start: needs tasks with worked solutions (data.train='synthetic'); {err}") from None
        pairs.append(SFTPair(tuple(math_prompt(tokenizer, task.question).token_ids),
                             tuple(encode_text(tokenizer, solution + QWEN_END_OF_TURN))))
    return pairs


def warm_start(config: Config, policy: Decoder, tokenizer, tasks: Sequence[MathTask], *, workdir: str | Path,
               resume: bool = False, mesh=None, log: Callable[[str], None] = print,
               log_every: int = 10) -> tuple[Decoder, list[dict]]:
    """Runs `config.warm_start` (a `TrainConfig`: steps, learning rate, schedule...) as block SFT of
    `policy` in `workdir` (checkpointed; `resume` continues it), logging the loss every `log_every`
    steps. Returns the SFT model and its history."""
    if config.warm_start is None:
        raise ConfigError("warm_start: the config has no warm_start section")
    sft_config = dataclasses.replace(config, train=config.warm_start)
    trainer = SFTTrainer(sft_config, policy, warm_start_pairs(tokenizer, tasks), workdir=workdir, mesh=mesh, log=log)

    def show(metrics: dict) -> None:
        if metrics["step"] % log_every == 0 or metrics["step"] == 1:
            log(f"sft step {metrics['step']:>4}  loss {metrics['loss']:.4f}")

    # saved at the end (and on SIGTERM): a resumed RL run loads it instead of training it again
    history = trainer.run(resume=resume, save_every=config.warm_start.steps, on_step=show)
    return trainer.policy(), history
