"""Data layer: tokenizers, dataset readers (dLLM-RL JSON formats), prompt templates, grain pipelines,
RL task sampling, HumanEval and the synthetic math tasks. Imports no model code.

Names are exported lazily so that ``import tradojax.data`` stays cheap (transformers and grain are
imported by the submodule that needs them, on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tokenizer": (
        "TokenizerError",
        "build_trado_tokenizer",
        "build_tiny_tokenizer",
        "load_tokenizer",
        "save_tokenizer",
        "special_token_ids",
        "CHATML_TEMPLATE",
        "TRADO_MASK_ID",
        "TRADO_EOS_ID",
    ),
    "readers": (
        "DataFormatError",
        "MathTask",
        "CodeTask",
        "SFTExample",
        "read_records",
        "read_math_tasks",
        "read_code_tasks",
        "read_sft_examples",
        "write_records",
        "math_task_from_dict",
        "code_task_from_dict",
        "sft_example_from_dict",
    ),
    "templates": (
        "RenderedPrompt",
        "math_prompt",
        "code_prompt",
        "option_prompt",
        "task_prompt",
        "llada_prompt",
        "llada_prompt_text",
        "encode_text",
        "encode_sft_example",
        "sft_example_from_prompt",
        "end_of_turn_text",
        "LLADA_TEMPLATE",
    ),
    "pipeline": (
        "PipelineConfig",
        "DataIterator",
        "make_dataset",
        "make_iterator",
        "pad_sequences",
        "TaskSampler",
        "TaskStep",
        "resolve_shard",
    ),
    "synthetic": (
        "SYNTHETIC_KINDS",
        "synthetic_math_tasks",
        "synthetic_math_splits",
        "split_train_heldout",
        "synthetic_solution",
    ),
    "humaneval": ("load_humaneval", "humaneval_test_list"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tradojax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tradojax.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
