"""Prompt templates of the dLLM-RL rollout/eval drivers (spec 2.5), returned as text and token ids.

The user-turn wording is the original's, character for character; the turn is rendered through
the tokenizer's own chat template when it has one (Qwen ChatML for TraDo/SDAR), else through the
ChatML string directly. Downstream code carries the token ids, never re-tokenises the text.

One quirk of the original, kept as an option: it renders its template strings with jinja2's default
``keep_trailing_newline=False``, which silently drops the final newline, so its prompts end in
``<|im_start|>assistant`` (or ``assistant<think>``), not ``assistant\\n``. ``strip_final_newline=True``
reproduces that for parity with models trained on such prompts (the TraDo/SDAR configs set
``data.strip_final_newline=True``); the default follows the chat template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from tradojax.data.readers import CodeTask, MathTask, SFTExample

if TYPE_CHECKING:  # annotations only: rendering prompts does not need transformers imported
    from transformers import PreTrainedTokenizerBase

PromptKind = Literal["math", "code_function", "code_stdio", "option"]

MATH_COT_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
THINK_MATH_INSTRUCTION = "You need to put your final answer in \\boxed{}. This is the problem:\n"
CODE_FUNCTION_INSTRUCTION = (
    "\nPlace your code within a single Python code block ```python ```. Do not include more than one code block. "
)
CODE_STDIO_INSTRUCTION = (
    "\nYou should put your code in ```python ```. Use input() to read input and print() to produce output in "
    "your script. "
)
OPTION_INSTRUCTION = (
    "\nYou need to think step by step and put the final option (A, B, C, or D only\u2014no other character) in "
    "\\boxed{}. "
)
PROBLEM_HEADER = "This is the problem:\n"

# LLaDA-8B-Instruct prompts of the original (its chat format, written out; spec 1.4).
LLADA_USER_HEADER = "<|startoftext|><|start_header_id|>user<|end_header_id|>"
LLADA_ASSISTANT_HEADER = "<|eot_id|><|startoftext|><|start_header_id|>assistant<|end_header_id|>\n"
LLADA_TEMPLATE = LLADA_USER_HEADER + "{problem}" + LLADA_ASSISTANT_HEADER
LLADA_END_OF_TURN = "<|eot_id|>"
QWEN_END_OF_TURN = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt: ``text`` for logs and output files, ``token_ids`` for the model."""

    text: str
    token_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.token_ids)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """Token ids of already-templated text: special-token strings map to their ids and nothing is
    added (no BOS: the template carries every marker the model expects)."""
    return tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))


def render_user_turn(tokenizer: PreTrainedTokenizerBase | None, user_content: str) -> str:
    """One user turn followed by the assistant generation header, via the chat template if any."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_content}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str):  # pragma: no cover - guards a transformers API change
            raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
        return rendered
    return f"<|im_start|>user\n{user_content}<|im_end|>\n<|im_start|>assistant\n"


def _finish(
    tokenizer: PreTrainedTokenizerBase,
    user_content: str,
    *,
    start_with_think: bool,
    strip_final_newline: bool,
    assistant_prefix: str = "",
) -> RenderedPrompt:
    text = render_user_turn(tokenizer, user_content)
    if start_with_think:
        # The original's think variant opens the thought right after "assistant", with no newline.
        text = text.removesuffix("\n") + "<think>\n"
    if strip_final_newline:
        text = text.removesuffix("\n")
    text += assistant_prefix
    return RenderedPrompt(text=text, token_ids=encode_text(tokenizer, text))


def _check_question(question: object) -> str:
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    return question


def math_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    *,
    start_with_think: bool = False,
    strip_final_newline: bool = False,
) -> RenderedPrompt:
    """Math chain-of-thought prompt asking for a ``\\boxed{}`` answer (or the ``<think>`` variant)."""
    question = _check_question(question)
    content = THINK_MATH_INSTRUCTION + question if start_with_think else question + MATH_COT_INSTRUCTION
    return _finish(tokenizer, content, start_with_think=start_with_think, strip_final_newline=strip_final_newline)


def option_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    *,
    start_with_think: bool = False,
    strip_final_newline: bool = False,
) -> RenderedPrompt:
    """Multiple-choice prompt asking for one letter A-D in ``\\boxed{}`` (eval only in the original)."""
    content = PROBLEM_HEADER + _check_question(question) + OPTION_INSTRUCTION
    return _finish(tokenizer, content, start_with_think=start_with_think, strip_final_newline=strip_final_newline)


def code_prompt(
    tokenizer: PreTrainedTokenizerBase,
    task: CodeTask,
    *,
    start_with_think: bool = False,
    strip_final_newline: bool = False,
) -> RenderedPrompt:
    """Code prompt: function tests get ``task.prefix`` after the assistant header (the model continues
    it, and the reward extracts code from prefix + output); stdio tests ask for input()/print()."""
    question = _check_question(task.question)
    if task.test_method == "function":
        if start_with_think:
            raise ValueError("the original defines no <think> variant of the function-test code prompt")
        return _finish(
            tokenizer,
            question + CODE_FUNCTION_INSTRUCTION,
            start_with_think=False,
            strip_final_newline=strip_final_newline,
            assistant_prefix=task.prefix or "",
        )
    return _finish(
        tokenizer,
        PROBLEM_HEADER + question + CODE_STDIO_INSTRUCTION,
        start_with_think=start_with_think,
        strip_final_newline=strip_final_newline,
    )


def task_prompt(
    tokenizer: PreTrainedTokenizerBase,
    task: MathTask | CodeTask,
    *,
    option: bool = False,
    start_with_think: bool = False,
    strip_final_newline: bool = False,
) -> RenderedPrompt:
    """The prompt for any task: math (or multiple choice with ``option=True``) or code."""
    kwargs = dict(start_with_think=start_with_think, strip_final_newline=strip_final_newline)
    if isinstance(task, CodeTask):
        return code_prompt(tokenizer, task, **kwargs)
    if isinstance(task, MathTask):
        if option:
            return option_prompt(tokenizer, task.question, **kwargs)
        return math_prompt(tokenizer, task.question, **kwargs)
    raise TypeError(f"task must be a MathTask or CodeTask, got {type(task).__name__}")


def llada_prompt_text(question: str, kind: PromptKind = "math") -> str:
    """The original's LLaDA prompt for ``kind`` ("math", "code_function" or "code_stdio")."""
    question = _check_question(question)
    if kind == "math":
        content = THINK_MATH_INSTRUCTION + question
    elif kind == "code_function":
        content = question + CODE_FUNCTION_INSTRUCTION
    elif kind == "code_stdio":
        # The original has an extra space after the newline in this one.
        content = PROBLEM_HEADER + question + "\n " + CODE_STDIO_INSTRUCTION.removeprefix("\n")
    else:
        raise ValueError(f"LLaDA prompts exist for 'math', 'code_function', 'code_stdio'; got {kind!r}")
    return LLADA_TEMPLATE.replace("{problem}", content)


def llada_prompt(tokenizer: PreTrainedTokenizerBase, question: str, kind: PromptKind = "math") -> RenderedPrompt:
    """:func:`llada_prompt_text` with its token ids under a LLaDA tokenizer."""
    text = llada_prompt_text(question, kind)
    return RenderedPrompt(text=text, token_ids=encode_text(tokenizer, text))


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The end-of-turn string SFT responses end with: ``<|im_end|>`` (TraDo/SDAR/Dream) or ``<|eot_id|>`` (LLaDA)."""
    vocab = tokenizer.get_vocab()
    for token in (QWEN_END_OF_TURN, LLADA_END_OF_TURN):
        if token in vocab:
            return token
    raise ValueError("tokenizer has neither '<|im_end|>' nor '<|eot_id|>' to end a turn")


def sft_example_from_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: RenderedPrompt, response: str, **extra: object
) -> SFTExample:
    """An SFT example whose response gets the end-of-turn string appended (as preprocess_sft does)."""
    return SFTExample(prompt=prompt.text, response=response + end_of_turn_text(tokenizer), extra=dict(extra))


def encode_sft_example(
    tokenizer: PreTrainedTokenizerBase, example: SFTExample
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt ids, response ids), tokenised separately so the boundary is exact."""
    return encode_text(tokenizer, example.prompt), encode_text(tokenizer, example.response)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, tasks: Sequence[MathTask | CodeTask], **kwargs: bool
) -> list[RenderedPrompt]:
    """:func:`task_prompt` for many tasks."""
    return [task_prompt(tokenizer, task, **kwargs) for task in tasks]
