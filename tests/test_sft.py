"""SFT: block / trace / semi-AR / random-masking rows, length buckets, exact resume, sharding,
full-attention (LLaDA, Dream) losses, block-size adaptation, and the `tradojax sft` command."""

import dataclasses
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import config_path
from tradojax import cli
from tradojax.config import ConfigError, MeshConfig, load_config
from tradojax.models.transformer import apply, init_model
from tradojax.ops.masks import BlockAlignment, MaskRule
from tradojax.parallel.mesh import make_mesh
from tradojax.parallel.sharding import state_shardings
from tradojax.rl.methods import row_builder
from tradojax.sft.batches import BatchPlan, assign_buckets
from tradojax.sft.commands import sft_main
from tradojax.sft.config import SFTConfig
from tradojax.sft.data import synthetic_pair, synthetic_sft_pairs
from tradojax.sft.trainer import Preempted, SFTPair, SFTTrainer, sft_rows
from tradojax.training.row_masks import full_trace_masks, random_masking_masks, semi_ar_masks
from tradojax.training.rows import RowLayout, pack_rows
from tradojax.training.step import sft_loss

# One optimizer for the in-process tests (a constant schedule: the compiled update does not depend
# on train.steps), so trainers of the same model and row shapes share one compiled step.
# One layer: the same code paths as two, and XLA compiles the update in about half the time.
OVERRIDES = ["train.batch_size=8", "train.learning_rate=3e-3", "train.schedule=constant", "train.warmup_steps=0",
             "model.num_layers=1"]
TWO_BUCKETS = SFTConfig(min_bucket=16)  # synthetic prompts of 26-40 tokens fall in two buckets


def sft_config(*extra):
    return load_config(config_path("sft_tiny.py"), OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def base():
    """(config, tokenizer, graphdef, params, train pairs, held-out tasks), built once."""
    from tradojax.data.tokenizer import tokenizer_from_name

    config = sft_config()
    tokenizer = tokenizer_from_name(config.tokenizer)
    pairs, held_out_tasks = synthetic_sft_pairs(48, config, tokenizer)
    graphdef, params = nnx.split(init_model(config.model, seed=0))
    return config, tokenizer, graphdef, params, pairs, held_out_tasks


def fresh_policy(base):
    _, _, graphdef, params, _, _ = base
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, params))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------ row builders


def test_trace_sft_rows_equal_tracerl_rows():
    """sft_rows(mode="trace") is TraceRL's row construction for the same trace, field by field."""
    rng = np.random.default_rng(0)
    for alignment in ("inference", "original"):
        config = sft_config("train.block_size=4", f"train.block_alignment={alignment}", "train.post_num=1")
        pairs = []
        for _ in range(3):
            n = int(rng.integers(5, 14))
            blocks = -(-n // 4)
            # a plausible decode order: block by block, a random order inside each block
            trace = np.concatenate([rng.permutation(4) + 1 + 4 * b for b in range(blocks)])[:n]
            pairs.append(SFTPair(tuple(rng.integers(4, 500, size=int(rng.integers(2, 9)))),
                                 tuple(rng.integers(4, 500, size=n)), tuple(int(s) for s in trace)))
        rows = sft_rows(pairs, config, np.random.default_rng(1), mode="trace", prompt_length=8, response_length=16,
                        shrink=2)
        builder = row_builder("tracerl")
        prompts, responses, noisy, trained = [], [], [], []
        for pair in pairs:
            for r in builder(np.asarray(pair.trace), len(pair.response), response_length=16,
                             prompt_length=len(pair.prompt), block_size=4, shrink=2, post_num=1,
                             alignment=BlockAlignment(alignment), lower_p=0.1, upper_p=0.9, rng=None):
                prompts.append(np.asarray(pair.prompt))
                responses.append(np.asarray(pair.response))
                noisy.append(r.noisy)
                trained.append(r.trained)
        expected = pack_rows(prompts, responses, noisy, trained, prompt_length=8, response_length=16, pad_id=0,
                             mask_id=3, block_size=4, alignment=BlockAlignment(alignment))
        assert len(rows) == len(expected) > len(pairs)
        for got, want in zip(jax.tree.leaves(rows), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(got, want)


def test_semi_ar_rows_by_hand():
    # 6 response tokens, L1 = 8, blocks of 4; p = 1 masks the whole current block
    rows = semi_ar_masks(6, 8, block_size=4, lower_p=1.0, upper_p=1.0, post_num=0, rng=np.random.default_rng(0))
    as_sets = [(set(np.flatnonzero(n)), set(np.flatnonzero(t))) for n, t in rows]
    assert as_sets == [({0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2, 3}),  # block 0 current, block 1 fully masked
                       ({4, 5, 6, 7}, {4, 5})]  # block 0 clean; tail pads 6, 7 masked, never trained
    # with a step map: blocks are groups of 2 distinct steps: (1,2) (3,4) (5,6) and the pads (7)
    trace = np.array([3, 1, 2, 5, 4, 6])
    rows = semi_ar_masks(6, 8, block_size=2, lower_p=1.0, upper_p=1.0, post_num=0, rng=np.random.default_rng(0),
                         trace=trace)
    as_sets = [(set(np.flatnonzero(n)), set(np.flatnonzero(t))) for n, t in rows]
    assert as_sets == [({0, 1, 2, 3, 4, 5, 6, 7}, {1, 2}), ({0, 3, 4, 5, 6, 7}, {0, 4}), ({3, 5, 6, 7}, {3, 5})]
    # p ~ U(0.1, 0.9) per position: earlier blocks always clean, later blocks always masked, and the
    # current block masked at the mean rate 0.5 (at least one token per row)
    rng = np.random.default_rng(1)
    current = []
    for _ in range(400):
        for i, (noisy, trained) in enumerate(semi_ar_masks(12, 12, block_size=4, lower_p=0.1, upper_p=0.9,
                                                           post_num=0, rng=rng)):
            block = np.arange(12) // 4
            assert not noisy[block < i].any() and noisy[block > i].all()
            assert trained.any() and (trained == (noisy & (block == i))).all()
            current.append(noisy[block == i].mean())
    assert abs(np.mean(current) - 0.5) < 0.03


def test_random_masking_rows_by_hand():
    rows = random_masking_masks(5, 8, times=3, lower_p=1.0, upper_p=1.0, post_num=1, rng=np.random.default_rng(0))
    assert len(rows) == 3
    for noisy, trained in rows:
        np.testing.assert_array_equal(noisy, np.ones(8, bool))  # tail pads are always masked ...
        np.testing.assert_array_equal(trained, np.arange(8) < 6)  # ... and only post_num=1 of them trained
    # one t per row: the masked fraction varies across rows like t ~ U(0, 1) (variance 1/12), far
    # more than per-position p_j ~ U(0, 1) masking would (variance ~ 1/(4 * 64))
    rows = random_masking_masks(64, 64, times=2000, lower_p=0.0, upper_p=1.0, post_num=0,
                                rng=np.random.default_rng(2))
    fractions = np.array([t.mean() for _, t in rows])
    assert abs(fractions.mean() - 0.5) < 0.02 and abs(fractions.var() - 1 / 12) < 0.01


def test_full_trace_rows_by_hand():
    # trace of 4 tokens, L1 = 6: steps [2, 1, 2, 3] + pads at step 4
    rows = full_trace_masks(np.array([2, 1, 2, 3]), 4, 6, shrink=1, post_num=0)
    assert [(set(np.flatnonzero(n)), set(np.flatnonzero(t))) for n, t in rows] == [
        ({0, 1, 2, 3, 4, 5}, {1}), ({0, 2, 3, 4, 5}, {0, 2}), ({3, 4, 5}, {3})]
    rows = full_trace_masks(np.array([2, 1, 2, 3]), 4, 6, shrink=2, post_num=0)  # steps (1,2) -> 2, (3,4) -> 4
    assert [(set(np.flatnonzero(n)), set(np.flatnonzero(t))) for n, t in rows] == [
        ({0, 1, 2, 3, 4, 5}, {0, 1, 2}), ({3, 4, 5}, {3})]


def test_pack_single_stream_rows_layout():
    rows = pack_rows([np.array([7, 8, 9])], [np.array([11, 12])], [np.array([False, True, True, True])],
                     [np.array([False, True, False, False])], prompt_length=5, response_length=4, pad_id=0,
                     mask_id=3, layout=RowLayout.SINGLE_STREAM)
    np.testing.assert_array_equal(rows.tokens, [[0, 0, 7, 8, 9, 11, 3, 3, 3]])
    assert rows.prompt_length == 5 and rows.response_length == 4
    np.testing.assert_array_equal(rows.segments.valid, [[False, False, True, True, True, True, True, True, True]])
    assert not rows.segments.block.any() and not rows.segments.kind.any()  # one block: the full mask
    np.testing.assert_array_equal(rows.positions, [[0, 0, 0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(rows.targets, [[11, 12, 0, 0]])


# ------------------------------------------------------------------------------------ full attention


def full_config(family, *extra):
    return sft_config(f"model.family={family}", "model.qk_norm=False", f"model.qkv_bias={family == 'dream'}",
                      *extra)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_full_attention_loss_matches_float64_hand_computation(family):
    """Per-row mean NLL over masked tokens; Dream reads token j's logit at position j - 1."""
    config = full_config(family)
    model = init_model(config.model, seed=4)
    rng = np.random.default_rng(3)
    pairs = [SFTPair(tuple(rng.integers(4, 500, size=int(rng.integers(2, 7)))),
                     tuple(rng.integers(4, 500, size=int(rng.integers(3, 9))))) for _ in range(3)]
    rows = sft_rows(pairs, config, rng, mode="random_masking", prompt_length=8, response_length=8,
                    mask_times_per_sample=2)
    graphdef, params = nnx.split(model)
    assert rows.layout is RowLayout.SINGLE_STREAM
    loss, metrics = jax.jit(lambda p, r: sft_loss(nnx.merge(graphdef, p), r, None, normalization="tokens"))(params, rows)
    logits = np.asarray(apply(graphdef, params, jnp.asarray(rows.tokens), jnp.asarray(rows.positions),
                              jax.tree.map(jnp.asarray, rows.segments), MaskRule.FULL), np.float64)
    shift = 1 if family == "dream" else 0
    response_logits = logits[:, 8 - shift: 16 - shift]
    top = response_logits.max(-1, keepdims=True)
    log_probs = response_logits - top - np.log(np.exp(response_logits - top).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, rows.targets[..., None], -1)[..., 0]
    per_row = -(picked * rows.loss_mask).sum(1) / rows.loss_mask.sum(1)
    assert len(rows) == 6 and rows.loss_mask.any(1).all()
    assert abs(float(loss) - per_row.mean()) < 1e-5 * per_row.mean()
    assert float(metrics["tokens"]) == rows.loss_mask.sum()


@pytest.mark.slow
@pytest.mark.parametrize("family,mode", [("llada", "random_masking"), ("dream", "semi_ar")])
def test_full_attention_sft_lowers_loss_on_a_repeated_batch(tmp_path, base, family, mode):
    config = full_config(family, "train.block_size=8", "train.steps=8")
    pairs = base[4][:8]  # one batch of 8 examples, the LLaDA/Dream rows made from them
    trainer = SFTTrainer(config, init_model(config.model, seed=0), pairs, workdir=tmp_path, mode=mode,
                         held_out=pairs, log=lambda _: None)
    before = trainer.held_out_loss()
    history = trainer.run()
    after = trainer.held_out_loss()
    assert all(np.isfinite(r["loss"]) for r in history)
    assert after < 0.85 * before, (before, after)  # measured: about 0.65


# ------------------------------------------------------------------------------------ the trainer


@pytest.mark.slow
def test_block_sft_lowers_held_out_loss_with_two_length_buckets(tmp_path, base, caplog):
    """Two buckets: every batch from one bucket, one compiled update per bucket shape, and the
    held-out loss (fixed masks, disjoint tasks) clearly falls."""
    config, tokenizer, _, _, pairs, held_out_tasks = base
    held_out = [synthetic_pair(task, config, tokenizer) for task in held_out_tasks]
    trainer = SFTTrainer(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=24)),
                         fresh_policy(base), pairs, workdir=tmp_path, held_out=held_out, sft=TWO_BUCKETS,
                         log=lambda _: None)
    buckets = sorted(trainer.plan.rows_per_bucket)
    assert len(buckets) == 2 and buckets[0][1] == buckets[1][1] == 16  # prompts of <= 32 and <= 40 tokens
    for epoch in range(3):
        for planned in trainer.plan.epoch(epoch):
            assert {trainer.buckets[e] for e, _ in planned.entries} == {planned.bucket}
    # the schedule is a pure function of (seed, step)
    again = BatchPlan(trainer.buckets, trainer.plan.row_counts, 8, config.experiment.seed)
    assert [again.locate(s) for s in range(12)] == [trainer.plan.locate(s) for s in range(12)]

    before = trainer.held_out_loss()
    cache_before = trainer.step_fn._cache_size()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        history = trainer.run(eval_every=12)
    compiles = [r for r in caplog.records if "Finished XLA compilation of jit(step)" in r.getMessage()]
    shapes = {tuple(r["bucket"]) for r in history}
    assert shapes == set(buckets)
    assert len(compiles) == trainer.step_fn._cache_size() - cache_before <= 2  # 0 if another test compiled them
    assert trainer.step_fn._cache_size() >= 2
    after = history[-1]["held_out_loss"]
    assert after < 0.6 * before, (before, after)
    lines = (tmp_path / "sft_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 25))


@pytest.mark.slow
def test_resume_is_bit_exact_after_sigterm_and_after_a_crash(tmp_path, base):
    config = base[0]
    pairs = base[4]
    steps = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=8))

    def trainer(name):
        return SFTTrainer(steps, fresh_policy(base), pairs, workdir=tmp_path / name, sft=TWO_BUCKETS,
                          log=lambda _: None)

    straight = trainer("straight")
    straight.run()

    first = trainer("resumed")  # SIGTERM after step 3: saved at the step boundary
    with pytest.raises(Preempted, match="saved SFT step 3"):
        first.run(save_every=5, on_step=lambda r: os.kill(os.getpid(), signal.SIGTERM) if r["step"] == 3 else None)

    def crash(record):
        if record["step"] == 6:
            raise RuntimeError("host lost")

    second = trainer("resumed")  # resumes at 3, saves at 5, dies after logging step 6
    with pytest.raises(RuntimeError, match="host lost"):
        second.run(resume=True, save_every=5, on_step=crash)
    assert second.checkpointer.latest_step() == 5

    third = trainer("resumed")
    third.run(resume=True, save_every=5)
    assert third.step == 8
    for a, b in zip(leaves(straight.params), leaves(third.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(straight.opt_state), leaves(third.opt_state)):
        np.testing.assert_array_equal(a, b)
    # the metrics file holds each step once (step 6's first record was replaced)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "sft_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [r["loss"] for r in straight.history]

    # a checkpoint of other data is refused
    from tradojax.checkpoint import CheckpointError

    other = SFTTrainer(steps, fresh_policy(base), pairs[:-8], workdir=tmp_path / "resumed", sft=TWO_BUCKETS,
                       log=lambda _: None)
    with pytest.raises(CheckpointError, match="other data or batching"):
        other.restore()


def test_sharded_step_equals_unsharded(tmp_path, base):
    """One SFT step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices equals the unsharded step."""
    # Adam's first update is lr * g / (|g| + eps): on near-zero gradients it magnifies the float
    # noise of another reduction order up to lr, so the step is compared at a small lr
    config = sft_config("train.learning_rate=1e-4")
    pairs = base[4]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    results = []
    for name, m in (("plain", None), ("sharded", mesh)):
        trainer = SFTTrainer(config, fresh_policy(base), pairs, workdir=tmp_path / name, sft=TWO_BUCKETS, mesh=m,
                             log=lambda _: None)
        record = trainer.train_step()
        results.append((trainer, record))
    (plain, a), (sharded, b) = results
    assert a["bucket"] == b["bucket"] and a["rows"] == b["rows"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    for x, y in zip(leaves(plain.params), leaves(sharded.params)):
        np.testing.assert_allclose(y, x, atol=1e-5)
    # parameters stay laid out by the train rules after the update (q_proj: embed over fsdp, heads over tensor)
    expected = state_shardings(sharded.params, mesh, "train")
    for leaf, want in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
    assert expected["layers"]["q_proj"].spec[1:3] == ("fsdp", "tensor")


@pytest.mark.slow
def test_block_size_adaptation_trains_at_8_and_evaluates_at_4_and_8(tmp_path, base):
    config, tokenizer, _, _, pairs, held_out_tasks = base
    adapted = sft_config("train.block_size=8", "train.steps=3", "sampling.max_new_tokens=8",
                         "eval.num_samples=1")
    assert adapted.model.block_size == 4
    trainer = SFTTrainer(adapted, fresh_policy(base), pairs, workdir=tmp_path,
                         sft=dataclasses.replace(TWO_BUCKETS, eval_block_sizes=(4, 8)),
                         tokenizer=tokenizer, eval_tasks=held_out_tasks[:4],
                         log=lambda _: None)
    rows, _, _, _ = trainer.rows_for_step(0)
    prompt_length = rows.prompt_length
    prompts = rows.segments.valid[:, :prompt_length].sum(1)
    response_blocks = rows.segments.block[:, prompt_length:prompt_length + rows.response_length]
    np.testing.assert_array_equal(response_blocks, (prompts[:, None] + np.arange(rows.response_length)) // 8)
    history = trainer.run(eval_every=3)
    record = history[-1]
    for block in (4, 8):
        accuracy = record[f"eval/b{block}/low_confidence_dynamic_k0/accuracy"]
        assert 0.0 <= accuracy <= 1.0
        assert record[f"eval/b{block}/low_confidence_dynamic_k0/mean_length"] > 0
    assert trainer.policy().config.block_size == 8  # exported as the new native block size


def test_mode_and_family_mismatch_is_a_config_error(tmp_path, base):
    with pytest.raises(ConfigError, match="sft.mode: 'semi_ar' does not apply to model.family='sdar'"):
        SFTTrainer(base[0], fresh_policy(base), base[4], workdir=tmp_path, mode="semi_ar")
    with pytest.raises(ConfigError, match="sft.mask_times_per_sample: must be >= 1"):
        SFTConfig(mode="random_masking", mask_times_per_sample=0)
    with pytest.raises(ValueError, match="train example 1: token id 9999 is outside the vocabulary"):
        SFTTrainer(base[0], fresh_policy(base), [SFTPair((5, 6), (7,)), SFTPair((5,), (9999,))], workdir=tmp_path)


def test_buckets_pow2_multiple_single():
    config = SFTConfig(buckets="pow2", min_bucket=16)
    assert assign_buckets([5, 20, 70], [3, 17, 40], config, 4) == [(16, 16), (32, 32), (72, 40)]
    config = SFTConfig(buckets="multiple", bucket_multiple=24)
    assert assign_buckets([5, 20, 70], [3, 17, 40], config, 8) == [(24, 24), (24, 24), (72, 40)]
    config = SFTConfig(buckets="single")
    assert assign_buckets([5, 20, 70], [3, 17, 40], config, 4) == [(72, 40)] * 3


# ------------------------------------------------------------------------------------ the command


@pytest.mark.slow
def test_cli_runs_end_to_end_and_writes_a_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = sft_main(["--config", config_path("sft_tiny.py"), "--synthetic", "64", "--config.train.steps=3",
                     "--workdir", str(workdir)])
    assert code == 0
    assert (workdir / "checkpoints" / "3").is_dir()
    records = [json.loads(line) for line in (workdir / "sft_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert "done: 3 steps" in capsys.readouterr().out


def test_cli_bad_input_names_the_file_and_line(tmp_path, capsys):
    """Through the command line's entry: exit code 2 and the file, line and field named."""
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["sft", "--config", config_path("sft_tiny.py"), "--data", str(missing)]) == 2
    assert f"{missing}: file does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "response": "ok<|im_end|>"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    assert cli.main(["sft", "--config", config_path("sft_tiny.py"), "--data", str(bad)]) == 2
    assert f"{bad}: line 2: field 'response': missing required field" in capsys.readouterr().err

    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps([good, dict(good, step_map=[1, -2])]))
    assert cli.main(["sft", "--config", config_path("sft_tiny.py"), "--data", str(negative), "--mode", "trace"]) == 2
    assert f"{negative}: item 1: field 'step_map': decoding steps must be >= 0" in capsys.readouterr().err

    assert cli.main(["sft", "--config", config_path("sft_tiny.py")]) == 2  # no data source
    assert "--data FILE or --synthetic N" in capsys.readouterr().err
