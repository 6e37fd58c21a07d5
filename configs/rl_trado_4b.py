"""TraceRL on TraDo-4B with math rewards: the original's `configs/rl_trado.yaml` (spec 3.11).

  tradojax rl --config=configs/rl_trado_4b.py --config.hf_checkpoint=/path/to/TraDo-4B-Instruct \
      --config.data.train=/path/to/MATH_train.json --config.data.eval=/path/to/MATH500.json

Sized for v5p:2x2x1 and v6e:2x2 (`tradojax aot --config=configs/rl_trado_4b.py` compiles every
program of the run for each and reports its per-chip memory): float32 master weights and AdamW
moments sharded over all chips (fsdp), heads and MLP split over tensor=2; the rollout keeps at
most 16 sequences resident per replica (a tensor pair; each holds 0.38 GiB of KV cache) and
refills their slots from the 1024 rows of a step; updates of 256 rows in micro-batches of 8.
On v5p the rollout has room for far more (--config.sampling.max_active=128); on v5e:2x4, use
--config.sampling.max_active=8 (README, "Does it fit?").
"""

from trado_4b import get_config as architecture


def get_config():
    config = architecture()
    config.experiment.name = "rl_trado_4b"
    config.experiment.workdir = "runs/rl_trado_4b"
    config.sampling.update(dict(block_size=4, denoising_steps=4, temperature=1.0, top_k=0, top_p=1.0,
                                remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.9,
                                max_new_tokens=2000, prompt_buckets=[256, 512, 784], max_active=16))
    config.model.param_dtype = "float32"  # master weights: AdamW steps of lr 1e-6 vanish in bfloat16
    config.data = dict(train="MATH_train.json", eval="MATH500.json", kind="math", strip_final_newline=True)
    config.train = dict(
        steps=100_000,  # optimizer updates over the whole run (the schedule's horizon)
        batch_size=256,  # rows per update: batch_size_lm 1 x 8 GPUs x GAS 32 in the original
        micro_batch_size=8,
        learning_rate=1e-6,
        schedule="constant",  # the original decays to 0 inside every step (bug 10.3): rl.optimizer_per_step="reset_cosine"
        weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0,
        block_size=4, block_alignment="inference", post_num=0,
        max_prompt_len=784, max_response_len=2000, loss_normalization="padded_length",
    )
    config.rl = dict(
        method="tracerl", steps=80, num_tasks_per_step=64, num_responses_per_task=16,
        clip_eps=0.2, beta=0.01, kl_estimator="k3", kl_reference="rollout", shrink=1,
        difficulty_lower=0.2, difficulty_upper=0.8, save_every=10, eval_every=10, reward_workers=16,
    )
    config.eval = dict(strategies=["low_confidence_dynamic", "low_confidence_static"], top_k=[0, 1],
                       num_samples=3, max_new_tokens=2000, chunk_tasks=128)
    config.mesh = dict(data=1, fsdp=-1, tensor=2, slices=["v5p:2x2x1", "v6e:2x2"])
    return config
