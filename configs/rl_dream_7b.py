"""TraceRL on Dream-7B-Instruct with math rewards (`configs/rl_dream.yaml`; spec 1.5, 2.7, 3.10).

  tradojax rl --config=configs/rl_dream_7b.py --config.hf_checkpoint=/path/to/Dream-v0-Instruct-7B \
      --config.data.train=/path/to/MATH_train.json --config.data.eval=/path/to/MATH500.json

Architecture (spec 1.5, Dream-7B): a Qwen2.5-7B backbone with q/k/v biases and shifted logits:
hidden 3584, 28 layers, 28 heads / 4 KV heads, MLP 18944, vocab 152064, RoPE theta 1e6; `<|mask|>`
151666, pad and EOS `<|endoftext|>` 151643.

Rollout (the Dream sampler, spec 2.7): a canvas of 1024 masks after prompts of up to 512 tokens,
blocks of 32 with one step per token, confidence target, static remasking (alg_temp 0, pad penalty
1), temperature 1, the prefix cache with a further horizon of 128 columns. RL (spec 3.10): shrink
8, lr 1e-6, clip 0.2, beta 0.01, updates of 2048 rows (batch_size_lm 2 x 8 GPUs x GAS 128). The
block size, steps and horizon of the original's rollout config are from memory (the spec names
gen_length 1024 only).

Sized for v5p:2x2x1 (`tradojax aot --config=configs/rl_dream_7b.py --programs rollout,eval`): float32
master weights and AdamW moments sharded over the chips, heads and MLP split over tensor=4, the
rollout in waves of at most 32 rows (GQA keeps a wave's K/V caches at 1.9 GiB). The learner trains
single-stream rows ([prompt | noisy response], spec 3.10); `--programs old_logprobs,policy_update`
compiles it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = dict(name="rl_dream_7b", workdir="runs/rl_dream_7b", seed=10086)
    config.model = dict(
        family="dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        max_position_embeddings=4096, tie_word_embeddings=False, qk_norm=False, qkv_bias=True, block_size=32,
        mask_token_id=151666, eos_token_id=151643, pad_token_id=151643,
        param_dtype="float32",  # master weights: AdamW steps of lr 1e-6 vanish in bfloat16
        compute_dtype="bfloat16", remat="full", attention_impl="auto",
    )
    config.sampling = dict(block_size=32, denoising_steps=32, temperature=1.0, top_k=0, top_p=1.0,
                           remasking_strategy="low_confidence_static", target="confidence", alg_temp=0.0,
                           pad_target_penalty=1.0, max_new_tokens=1024, gen_length=1024, cache_mode="prefix",
                           further_horizon=128, prompt_buckets=[256, 512], max_active=32)
    config.data = dict(train="MATH_train.json", eval="MATH500.json", kind="math")
    config.train = dict(
        steps=100_000, batch_size=2048, micro_batch_size=8, learning_rate=1e-6, schedule="constant",
        weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0, block_size=32, post_num=0,
        max_prompt_len=512, max_response_len=1024, loss_normalization="tokens",
    )
    config.rl = dict(
        method="tracerl", steps=80, num_tasks_per_step=64, num_responses_per_task=16,
        clip_eps=0.2, beta=0.01, kl_estimator="k3", kl_reference="rollout", shrink=8, mask_times_per_sample=35,
        difficulty_lower=0.2, difficulty_upper=0.8, save_every=10, eval_every=10, reward_workers=16,
    )
    config.eval = dict(strategies=["low_confidence_dynamic", "low_confidence_static"], top_k=[0, 1],
                       num_samples=3, max_new_tokens=1024, chunk_tasks=128)
    config.mesh = dict(data=1, fsdp=-1, tensor=4, slices=["v5p:2x2x1"])
    config.hf_checkpoint = None
    config.tokenizer = None  # the checkpoint's own
    return config
