"""TraceRL on a long-CoT model, TraDo-8B-Thinking style: responses open with `<think>` and run up to
30,000 new tokens (paper-results 1.3: response limit 30,000, dynamic sampling only, the thinking
prompt; the original's long-CoT eval stops at `<|im_end|>`, spec 5).

  tradojax rl --config=configs/rl_trado_8b_thinking.py --config.hf_checkpoint=/path/to/TraDo-8B-Thinking \
      --config.data.train=/path/to/MATH_train.json --config.data.eval=/path/to/MATH500.json

The paper gives no RL settings for the thinking model; the step here is 32 tasks x 8 responses,
updates of 64 rows of 784 + 2 x 30,000 tokens, one row per micro-step.

Sized for v5p:2x2x1 (`tradojax aot --config=configs/rl_trado_8b_thinking.py`): weights and AdamW
moments sharded over the four chips, heads split over tensor=4; a sequence's KV cache spans 30,784
positions (4.2 GiB for the 8B), so at most 8 sequences are resident at once, and the others wait
for their slots.
"""

from rl_trado_8b import get_config as rl_8b

IM_END = 151645  # <|im_end|>


def get_config():
    config = rl_8b()
    config.experiment.name = "rl_trado_8b_thinking"
    config.experiment.workdir = "runs/rl_trado_8b_thinking"
    config.data.start_with_think = True  # the prompt ends in "<|im_start|>assistant<think>"
    config.sampling.update(dict(max_new_tokens=30_000, stop_token_ids=[IM_END], max_active=8))
    config.train.update(dict(batch_size=64, micro_batch_size=1, max_response_len=30_000))
    config.rl.update(dict(num_tasks_per_step=32, num_responses_per_task=8))
    config.eval = dict(strategies=["low_confidence_dynamic"], top_k=[0], num_samples=1, max_new_tokens=30_000,
                       chunk_tasks=64)
    config.mesh = dict(data=1, fsdp=-1, tensor=4, slices=["v5p:2x2x1"])
    return config
