"""Experiment configuration: frozen, validated dataclasses.

Experiments are written as ml-collections `get_config()` files under `configs/`. They are converted
once, at the edge (`load_config`), into the frozen dataclasses below; nothing past that point sees a
ConfigDict, and jit only ever sees plain Python values unpacked from these dataclasses.

Every problem is a `ConfigError` naming the dotted field: an unknown field, a wrong type, or an
impossible value (heads not dividing, block size < 1, ...).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import ml_collections


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted field name."""


def _fail(field: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{field}: {message}")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

Family = Literal["sdar", "llada", "dream"]
DType = Literal["float32", "bfloat16"]
AttentionImpl = Literal["auto", "reference", "pallas"]
RematPolicy = Literal["none", "full", "dots"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder. Defaults are a tiny SDAR-style model (tests and the demo)."""

    family: Family = "sdar"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # Qwen3/SDAR: per-head RMSNorm on q and k before RoPE
    qkv_bias: bool = False  # Dream: biases on q, k, v
    initializer_range: float = 0.02
    block_size: int = 4  # the checkpoint's native diffusion block size (HF config `block_size`)
    mask_token_id: int = 3
    eos_token_id: int = 0
    pad_token_id: int = 0
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: RematPolicy = "none"
    attention_impl: AttentionImpl = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings", "block_size"):
            if getattr(self, name) < 1:
                _fail(f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
            if getattr(self, name) >= 2**31:  # shapes and ids reach jit as int32
                _fail(f"model.{name}", f"must be < 2**31, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            _fail("model.num_kv_heads", f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.head_dim % 2:
            _fail("model.head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0:
            _fail("model.rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            _fail("model.rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                _fail(f"model.{name}", f"must be in [0, vocab_size={self.vocab_size}), got {value}")

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def logits_shifted(self) -> bool:
        """Dream predicts token i+1 at position i (AR-initialised); SDAR and LLaDA predict token i."""
        return self.family == "dream"

    def num_params(self) -> int:
        """Parameter count, as the Hugging Face checkpoint counts it."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head


RemaskingStrategy = Literal["low_confidence_static", "low_confidence_dynamic", "sequential", "entropy_bounded"]
FullAttentionTarget = Literal["confidence", "margin_confidence", "neg_entropy", "random"]
FullAttentionCache = Literal["none", "prefix", "dual"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Block-diffusion sampling (spec section 2; defaults are the RL rollout's)."""

    block_size: int = 4
    denoising_steps: int = 4
    temperature: float = 1.0
    top_k: int = 0  # 0 = off; 1 = greedy
    top_p: float = 1.0
    remasking_strategy: RemaskingStrategy = "low_confidence_dynamic"
    dynamic_threshold: float = 0.9
    eb_threshold: float = 0.35
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    num_samples: int = 1  # responses per prompt (the RL group size)
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    seed: int = 0
    # sequences resident at once per data-parallel replica (the original's rollout max_active); the
    # others wait and take the slots that finished ones free (results do not depend on it)
    max_active: int = 256
    # Full-attention models (LLaDA, Dream; sampling/full_diffusion.py, spec 2.6-2.7). The canvas is
    # `gen_length` masks after the prompt (0: max_new_tokens rounded up to whole blocks), decoded in
    # blocks of `block_size`; `total_steps` steps over the canvas split over the blocks, the remainder
    # to the first ones (0: `denoising_steps` per block).
    gen_length: int = 0
    total_steps: int = 0
    target: FullAttentionTarget = "confidence"  # the score that ranks positions to commit
    alg_temp: float = 0.0  # Dream static: > 0 draws the committed positions from softmax(score / alg_temp)
    pad_target_penalty: float = 1.0  # Dream: pad proposals' scores are divided by this
    cache_mode: FullAttentionCache = "prefix"  # none (full forward every step), prefix (Fast-dLLM) or dual
    further_horizon: int | None = None  # prefix cache: columns after the block forwarded (None: all)

    @property
    def full_gen_length(self) -> int:
        """The full-attention canvas' generated region (`gen_length`, or max_new_tokens in whole blocks)."""
        return self.gen_length or -(-self.max_new_tokens // self.block_size) * self.block_size

    def __post_init__(self) -> None:
        if self.max_active < 1:
            _fail("sampling.max_active", f"must be >= 1, got {self.max_active}")
        if self.gen_length < 0 or (self.gen_length and (self.block_size < 1 or self.gen_length % self.block_size
                                                        or self.gen_length < self.max_new_tokens)):
            _fail("sampling.gen_length", f"must be 0 (max_new_tokens in whole blocks) or a multiple of "
                                         f"block_size={self.block_size} >= max_new_tokens={self.max_new_tokens}, "
                                         f"got {self.gen_length}")
        if self.total_steps and self.block_size >= 1:
            blocks = self.full_gen_length // self.block_size
            if not blocks <= self.total_steps <= self.full_gen_length:
                _fail("sampling.total_steps", f"must be 0 (denoising_steps per block) or in [blocks={blocks}, "
                                              f"gen_length={self.full_gen_length}], got {self.total_steps}")
        if self.total_steps < 0:
            _fail("sampling.total_steps", f"must be >= 0, got {self.total_steps}")
        if self.alg_temp < 0:
            _fail("sampling.alg_temp", f"must be >= 0 (0 = top-k by score), got {self.alg_temp}")
        if self.pad_target_penalty <= 0:
            _fail("sampling.pad_target_penalty", f"must be > 0 (1 = no penalty), got {self.pad_target_penalty}")
        if self.further_horizon is not None and self.further_horizon < 0:
            _fail("sampling.further_horizon", f"must be >= 0 or None (every column), got {self.further_horizon}")
        if self.further_horizon is not None and self.cache_mode != "prefix":
            _fail("sampling.further_horizon", f"applies to cache_mode='prefix' only (cache_mode={self.cache_mode!r})")
        if self.block_size < 1:
            _fail("sampling.block_size", f"must be >= 1, got {self.block_size}")
        if not 1 <= self.denoising_steps <= self.block_size:
            _fail("sampling.denoising_steps",
                  f"must be in [1, block_size={self.block_size}], got {self.denoising_steps}")
        if self.temperature <= 0:
            _fail("sampling.temperature", f"must be > 0 (use top_k=1 for greedy), got {self.temperature}")
        if self.top_k < 0:
            _fail("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            _fail("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.dynamic_threshold <= 1:
            _fail("sampling.dynamic_threshold", f"must be in [0, 1], got {self.dynamic_threshold}")
        if self.eb_threshold <= 0:
            _fail("sampling.eb_threshold", f"must be > 0, got {self.eb_threshold}")
        if self.max_new_tokens < 1:
            _fail("sampling.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            _fail("sampling.num_samples", f"must be >= 1, got {self.num_samples}")
        if not self.prompt_buckets or list(self.prompt_buckets) != sorted(set(self.prompt_buckets)):
            _fail("sampling.prompt_buckets", f"must be a non-empty increasing list, got {self.prompt_buckets}")


Schedule = Literal["constant", "cosine", "linear"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and row construction shared by SFT and RL (spec sections 3.6 and 5)."""

    steps: int = 100  # optimizer updates
    batch_size: int = 16  # rows per update (global)
    micro_batch_size: int = 0  # rows per micro-step; 0 = the whole batch in one pass
    learning_rate: float = 1e-5
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear decay to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    block_size: int = 4  # training block size (must equal the sampler's for TraceRL)
    block_alignment: Literal["inference", "original"] = "inference"
    lower_p: float = 0.1  # per-position mask probability ~ U(lower_p, upper_p) (block SFT)
    upper_p: float = 0.9
    post_num: int = 0  # right pads (= EOS for TraDo) kept in the loss; the original's default 0
    max_prompt_len: int = 784
    max_response_len: int = 2000
    loss_normalization: Literal["padded_length", "tokens"] = "padded_length"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "max_prompt_len", "max_response_len"):
            if getattr(self, name) < 1:
                _fail(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            _fail("train.micro_batch_size", f"must divide batch_size={self.batch_size}, got {self.micro_batch_size}")
        if self.learning_rate <= 0:
            _fail("train.learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            _fail("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.lower_p <= self.upper_p <= 1:
            _fail("train.lower_p", f"need 0 <= lower_p <= upper_p <= 1, got {self.lower_p}, {self.upper_p}")
        if self.max_grad_norm < 0:
            _fail("train.max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.post_num < 0:
            _fail("train.post_num", f"must be >= 0, got {self.post_num}")

    @property
    def num_micro_batches(self) -> int:
        return self.batch_size // self.micro_batch_size if self.micro_batch_size else 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tasks come from: a file in the original's formats (spec section 7) or built-ins."""

    train: str = "synthetic"  # a .json/.jsonl/.parquet path, "synthetic" or "humaneval"
    eval: str = "synthetic"
    kind: Literal["math", "code"] = "math"
    synthetic_train_size: int = 2000
    synthetic_eval_size: int = 64
    synthetic_difficulty: int = 1
    synthetic_kinds: tuple[str, ...] = ()  # () = the arithmetic kinds (tradojax.data.synthetic)
    start_with_think: bool = False
    # The original renders prompts with jinja2's default keep_trailing_newline=False: they end in
    # "<|im_start|>assistant", not "assistant\n". TraDo was trained and evaluated on that text, so the
    # TraDo/SDAR configs set True; our own models keep the chat template's newline.
    strip_final_newline: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("synthetic_train_size", "synthetic_eval_size", "synthetic_difficulty"):
            if getattr(self, name) < 1:
                _fail(f"data.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The evaluation sweep (spec section 8): each (strategy, top_k) pair is one run."""

    strategies: tuple[RemaskingStrategy, ...] = ("low_confidence_dynamic", "low_confidence_static")
    top_k: tuple[int, ...] = (0, 1)
    num_samples: int = 3  # k responses per task: accuracy is avg@k; pass@k for code
    num_tasks: int = 0  # 0 = all
    max_new_tokens: int = 0  # 0 = sampling.max_new_tokens
    output: str = ""  # results JSON path ("" = <workdir>/eval.json)
    # tasks per sampler call: each call's results are appended to the JSONL stream as soon as they
    # are scored (a killed eval loses at most one call's work); part of the sampling seed, so the
    # same value reproduces a run
    chunk_tasks: int = 64
    # score responses of >= max_new_tokens - 5 tokens as wrong, as in RL rewards; the original's
    # eval does not (its accuracy is the raw correctness)
    truncation_penalty: bool = False

    def __post_init__(self) -> None:
        if len(self.strategies) != len(self.top_k) or not self.strategies:
            _fail("eval.top_k", f"must pair element-wise with eval.strategies: {self.strategies} vs {self.top_k}")
        if self.num_samples < 1:
            _fail("eval.num_samples", f"must be >= 1, got {self.num_samples}")
        if self.num_tasks < 0 or self.max_new_tokens < 0:
            _fail("eval.num_tasks", "num_tasks and max_new_tokens must be >= 0")
        if self.chunk_tasks < 1:
            _fail("eval.chunk_tasks", f"must be >= 1, got {self.chunk_tasks}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """TraceRL and its siblings (spec sections 3 and 4; defaults are `rl_trado.yaml`'s)."""

    method: Literal["tracerl", "random_masking", "coupled"] = "tracerl"
    steps: int = 80
    num_tasks_per_step: int = 64
    num_responses_per_task: int = 16
    clip_eps: float = 0.2
    beta: float = 0.01
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_reference: Literal["rollout", "initial"] = "rollout"  # the original: the rollout policy
    shrink: int = 1
    # LLaDA/Dream random_masking and coupled: random rows per response (the original's default 35)
    mask_times_per_sample: int = 1
    difficulty_lower: float = 0.2
    difficulty_upper: float = 0.8
    epochs_per_step: int = 1
    # "keep": AdamW state and the train.schedule run across RL steps; "reset": a fresh AdamW every
    # step (the schedule restarts); "reset_cosine": the original (spec 3.6), a fresh AdamW whose LR
    # decays by half-cosine towards 0 over that step's updates (train.schedule is not used).
    optimizer_per_step: Literal["keep", "reset", "reset_cosine"] = "keep"
    value_model: bool = False
    value_learning_rate: float = 5e-6
    train_value_every: int = 1  # the value model trains at steps (1-based) divisible by this
    # 0: each update's gradient is the mean over its rows (a partial last batch: over its real rows).
    # N > 0: the original under DeepSpeed with gradient_accumulation_steps N (spec 3.6): that gradient
    # divided by N once more, and a last partial batch is not applied.
    original_accumulation_steps: int = 0
    gamma: float = 1.0
    lam: float = 1.0
    save_every: int = 10
    eval_every: int = 10
    reward_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "num_tasks_per_step", "num_responses_per_task", "shrink", "epochs_per_step",
                     "train_value_every", "save_every", "eval_every", "reward_workers", "mask_times_per_sample"):
            if getattr(self, name) < 1:
                _fail(f"rl.{name}", f"must be >= 1, got {getattr(self, name)}")
        if not 0 < self.clip_eps < 1:
            _fail("rl.clip_eps", f"must be in (0, 1), got {self.clip_eps}")
        if self.beta < 0:
            _fail("rl.beta", f"must be >= 0, got {self.beta}")
        if not 0 <= self.difficulty_lower <= self.difficulty_upper <= 1:
            _fail("rl.difficulty_lower", f"need 0 <= lower <= upper <= 1, got {self.difficulty_lower}, "
                  f"{self.difficulty_upper}")
        if self.value_model and self.method != "tracerl":
            _fail("rl.value_model", f"the value model needs method='tracerl', got {self.method!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            _fail("rl.gamma", f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.original_accumulation_steps < 0:
            _fail("rl.original_accumulation_steps", f"must be >= 0 (0 = off), got {self.original_accumulation_steps}")
        if self.value_learning_rate <= 0:
            _fail("rl.value_learning_rate", f"must be > 0, got {self.value_learning_rate}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the (data, fsdp, tensor) axes; -1 takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # the TPU slices this config is sized for (e.g. "v5p:2x2x1"): `tradojax aot --config C` compiles
    # every program of the run on each of them with this mesh and reports whether it fits
    slices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if sum(1 for v in sizes.values() if v == -1) > 1:
            _fail("mesh", "at most one axis may be -1")
        for name, value in sizes.items():
            if value == 0 or value < -1:
                _fail(f"mesh.{name}", f"must be >= 1 or -1, got {value}")


SFTMode = Literal["auto", "block", "trace", "semi_ar", "random_masking"]
SFT_MODES: tuple[str, ...] = ("block", "trace", "semi_ar", "random_masking")
# Dual-stream (block-causal) modes and single-stream (full attention) modes per model family, and
# the original's default of each: sft_trado/sft_sdar "semi-ar" (our block SFT), sft_llada random
# masking, sft_dream semi-ar (sliced). Modes: tradojax/sft/config.py.
SFT_FAMILY_MODES: dict[str, tuple[str, ...]] = {
    "sdar": ("block", "trace"),
    "llada": ("semi_ar", "random_masking", "trace"),
    "dream": ("semi_ar", "random_masking", "trace"),
}
SFT_DEFAULT_MODES: dict[str, str] = {"sdar": "block", "llada": "random_masking", "dream": "semi_ar"}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """How `tradojax sft` builds and batches rows, and when it saves and evaluates."""

    mode: SFTMode = "auto"  # "auto": the family's default (SFT_DEFAULT_MODES)
    shrink: int = 1  # trace modes: merge groups of `shrink` consecutive distinct steps (training.shrink)
    mask_times_per_sample: int = 1  # random_masking: rows per example (m; LLaDA 1, Dream 35)
    # Length buckets: examples are grouped by padded (prompt, response) lengths; each batch comes
    # from one bucket and each bucket shape compiles once. "pow2": the next power of two (at least
    # `min_bucket`); "multiple": the next multiple of `bucket_multiple`; "single": one bucket, the
    # longest example (every batch padded to it).
    buckets: Literal["pow2", "multiple", "single"] = "pow2"
    bucket_multiple: int = 64
    min_bucket: int = 64
    save_every: int = 0  # steps between checkpoints (0: at the end only with `tradojax sft`; SIGTERM saves)
    eval_every: int = 0  # steps between held-out loss / sampling evals (0: none)
    # Sampling block sizes evaluated at each eval (block-size adaptation evaluates at the old and
    # the new size); empty: `sampling.block_size` only.
    eval_block_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("auto", *SFT_MODES):
            _fail("sft.mode", f"must be one of {['auto', *SFT_MODES]}, got {self.mode!r}")
        if self.buckets not in ("pow2", "multiple", "single"):
            _fail("sft.buckets", f"must be 'pow2', 'multiple' or 'single', got {self.buckets!r}")
        for name in ("shrink", "mask_times_per_sample", "bucket_multiple", "min_bucket"):
            if getattr(self, name) < 1:
                _fail(f"sft.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                _fail(f"sft.{name}", f"must be >= 0, got {getattr(self, name)}")
        for i, size in enumerate(self.eval_block_sizes):
            if size < 1:
                _fail(f"sft.eval_block_sizes[{i}]", f"must be >= 1, got {size}")

    def check_family(self, family: str) -> None:
        """Raises ConfigError when `mode` does not fit the model family's attention."""
        if self.mode == "auto":
            return
        if self.mode not in SFT_FAMILY_MODES.get(family, ()):
            hint = ("block-diffusion (sdar) models train with the dual-stream modes 'block' and 'trace'"
                    if family == "sdar" else
                    f"full-attention ({family}) models train with single-stream rows: 'semi_ar', "
                    "'random_masking' or 'trace'")
            _fail("sft.mode", f"{self.mode!r} does not apply to model.family={family!r}; {hint}")

    def for_family(self, family: str) -> SFTConfig:
        """This config with `mode` "auto" resolved to the family's default, checked against it."""
        resolved = self if self.mode != "auto" else dataclasses.replace(self, mode=SFT_DEFAULT_MODES[family])
        resolved.check_family(family)
        return resolved


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "tradojax"
    workdir: str = "runs/tradojax"
    seed: int = 10086


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole experiment. Sections not given in a config file take their defaults."""

    experiment: ExperimentConfig = ExperimentConfig()
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    rl: RLConfig = RLConfig()
    mesh: MeshConfig = MeshConfig()
    sft: SFTConfig = SFTConfig()  # `tradojax sft` (and the warm start's row options)
    # An SFT stage before RL (`tradojax rl`, `tradojax demo`): block SFT with these optimisation
    # settings on the training tasks' worked solutions (synthetic tasks). None = start RL directly.
    warm_start: TrainConfig | None = None
    # Weights: a local Hugging Face directory, a params checkpoint (import-hf) or a training run
    # directory (its newest intact step; models/loading.py), or None for random initialisation.
    hf_checkpoint: str | None = None
    tokenizer: str | None = None  # a local tokenizer directory, "tiny" or "qwen3"


# ----------------------------------------------------------------------------------------------
# Conversion from ConfigDict / dict, with validation
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _convert(value: Any, tp: Any, field: str) -> Any:
    """Checks `value` against the annotation `tp` and converts lists to tuples, dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, field)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            _fail(field, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own error names the field that is wrong
            return _convert(value, others[0], field)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, field)
            except ConfigError as err:
                errors.append(str(err))
        _fail(field, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(field, f"expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        return tuple(_convert(v, item_type, f"{field}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(field, f"expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(field, f"expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(field, f"expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(field, f"expected str, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{field}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a (Config)dict; unknown fields and wrong types raise ConfigError."""
    if isinstance(data, cls):
        return data
    if isinstance(data, ml_collections.ConfigDict):
        data = data.to_dict()
    where = prefix or "config"
    if not isinstance(data, dict):
        _fail(where, f"expected a section (dict), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        _fail(name, f"unknown field (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(value, hints[key], name)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a section type used under another name (warm_start is a TrainConfig)
        home = _SECTION_NAMES.get(cls)
        message = str(err)
        if home and prefix and prefix != home and message.startswith(home + "."):
            raise ConfigError(prefix + message[len(home):]) from None
        raise


# the section name each section type's own checks use in their messages
_SECTION_NAMES = {typing.get_type_hints(Config)[name]: name for name in
                  ("experiment", "model", "sampling", "train", "data", "eval", "rl", "mesh", "sft")}


def to_dict(config: Any) -> dict:
    """The inverse of `from_dict` (tuples become lists): for saving next to checkpoints."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value
    return plain(config)


def _parse_override_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare string such as bfloat16


def apply_overrides(config_dict: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies `a.b.c=value` overrides (values parsed as Python literals, else strings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected FIELD=VALUE")
        key, raw = item.split("=", 1)
        key = key.removeprefix("--").removeprefix("config.")
        node = config_dict
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted field name such as rl.steps")
        for depth, part in enumerate(parts[:-1]):
            if part not in node:  # a section the file leaves at its defaults; from_dict validates names
                with config_dict.unlocked():
                    node[part] = ml_collections.ConfigDict()
            node = node[part]
            if node is None:  # an optional section the file sets to None (warm_start = None)
                with config_dict.unlocked():
                    node = _set_section(config_dict, parts[:depth + 1])
            if not isinstance(node, (ml_collections.ConfigDict, dict)):
                section = ".".join(parts[:depth + 1])
                _fail(key, f"{section} = {node!r} is a value, not a section with fields")
        value = _parse_override_value(raw)
        if parts[-1] in node and isinstance(node[parts[-1]], float) and isinstance(value, int):
            value = float(value)
        with config_dict.unlocked() if hasattr(config_dict, "unlocked") else _nullcontext():
            try:
                node[parts[-1]] = value
            except (TypeError, KeyError, AttributeError) as err:
                _fail(key, str(err))


def _set_section(config_dict: ml_collections.ConfigDict, parts: list[str]) -> ml_collections.ConfigDict:
    parent = config_dict
    for part in parts[:-1]:
        parent = parent[part]
    try:
        parent[parts[-1]] = ml_collections.ConfigDict()
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        _fail(".".join(parts), str(err))
    return parent[parts[-1]]


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_config_dict(path: str | Path) -> ml_collections.ConfigDict:
    """Imports a `get_config()` file and returns its ConfigDict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"tradojax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.absolute()))  # config files may build on their siblings
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # the user's file: report it with its name
        raise ConfigError(f"config file {path} failed to import: {type(err).__name__}: {err}") from None
    finally:
        sys.path.pop(0)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} has no get_config() function")
    try:
        config_dict = module.get_config()
    except (Exception, SystemExit) as err:  # RecursionError and sys.exit() in the user's code too
        raise ConfigError(f"config file {path}: get_config() raised {type(err).__name__}: {err}") from None
    if isinstance(config_dict, dict):
        config_dict = ml_collections.ConfigDict(config_dict)
    if not isinstance(config_dict, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() must return a ConfigDict, got {type(config_dict).__name__}")
    return config_dict


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """`configs/x.py` + `a.b=value` overrides -> a validated, frozen Config."""
    config_dict = load_config_dict(path)
    apply_overrides(config_dict, list(overrides))
    try:
        return from_dict(Config, config_dict)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Separates `--config=FILE` and `--config.a.b=v` (absl style) from other arguments."""
    path, overrides, rest = None, [], []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[len("--config."):])
            else:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"{arg}: missing value")
                overrides.append(f"{arg[len('--config.'):]}={value}")
        else:
            rest.append(arg)
    return path, overrides, rest
