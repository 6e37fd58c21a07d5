"""`tradojax aot`: the programs `tradojax rl` and `tradojax eval` run, through the real TPU compiler
(libtpu) on this CPU host.

The learner's programs are checked to be the trainer's own: lowered on the abstract layouts aot
builds, they give the same text as lowered on the arrays an `RLTrainer` holds on a CPU mesh. Every
shipped config's programs lower for every slice it names, with 2 layers (the layer count the only
change); the headline config's rollout and update compile for its slice.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tradojax import aot, cli
from tradojax.config import ConfigError, MeshConfig, load_config
from tradojax.data.tasks import load_tasks
from tradojax.data.tokenizer import tokenizer_from_name
from tradojax.models.transformer import init_model
from tradojax.models.value import ValueModel
from tradojax.parallel.mesh import make_mesh
from tradojax.rl.loop import RLTrainer, build_step_rows, forward_batch_size, optimizers, rl_programs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# a tiny model with head_dim 128 (the TPU kernels' lane width); an RL step of 4 tasks x 2 responses
TINY_RL = ["model.head_dim=128", "model.num_heads=2", "model.num_kv_heads=1", "mesh.data=1", "mesh.fsdp=4",
           "rl.num_tasks_per_step=4", "rl.num_responses_per_task=2", "train.batch_size=8", "train.micro_batch_size=4",
           "train.max_prompt_len=60", "sampling.max_new_tokens=32", "sampling.max_active=2", "eval.chunk_tasks=8",
           "eval.num_samples=2"]
RL_PROGRAMS = {"rollout/start", "rollout/refill", "rollout/decode", "rollout/outputs", "old_logprobs", "policy_update"}


def test_aot_compiles_every_program_of_an_rl_step_for_v5p(tmp_path, capsys):
    out = tmp_path / "aot.json"
    # the reference attention keeps this one quick; the Pallas kernels' TPU lowering is what the
    # shipped configs' compile test (below) and tests/test_tpu_compile.py exercise
    argv = ["aot", f"--config={CONFIGS / 'tiny.py'}", *(f"--config.{o}" for o in TINY_RL), "--command", "rl",
            "--topology", "v5p:2x2x1", "--attention", "reference", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "topology v5p:2x2x1: 4 chips, mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in printed
    assert "attention=reference" in printed
    report = {r["program"]: r for r in json.loads(out.read_text())}
    eval_points = {f"eval/{s}/top_k={k}/{p}" for s, k in (("low_confidence_dynamic", 0), ("low_confidence_static", 1))
                   for p in ("start", "refill", "decode", "outputs")}
    assert set(report) == RL_PROGRAMS | eval_points
    assert all(r["fits"] and not r["error"] for r in report.values())
    update = report["policy_update"]
    # params and AdamW state are donated and come back in place: what XLA aliases is the trainer
    # state aot counts as resident beside the rollout (float32 params and two moments, sharded over
    # fsdp=4 where the dimension divides), plus the TPU's tile padding of the small norm vectors
    config = load_config(CONFIGS / "tiny.py", TINY_RL)
    state_bytes = 3 * config.model.num_params() * 4
    assert state_bytes / 4 < update["alias_bytes"] < state_bytes / 2
    resident = report["rollout/decode"]["resident_bytes"]
    assert resident <= update["alias_bytes"] < resident * 1.01
    assert update["resident_bytes"] == 0  # the update takes all of the trainer's state
    # the old log-probs' resident share is the optimizer state: two of the three state copies
    assert report["old_logprobs"]["resident_bytes"] == pytest.approx(resident * 2 / 3, rel=0.01)
    assert report["rollout/decode"]["alias_bytes"] > 0  # the decode state (KV cache) is updated in place
    # the two strategies share the prefill (start) program, not the decode loop
    assert report["eval/low_confidence_static/top_k=1/start"]["same_as"] == "eval/low_confidence_dynamic/top_k=0/start"
    assert not report["eval/low_confidence_static/top_k=1/decode"]["same_as"]


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("value_model", [False, True])
def test_learner_programs_are_the_trainers_own(tmp_path, value_model):
    """On a (data=2, fsdp=2, tensor=2) CPU mesh: aot's abstract parameters and optimizer state carry
    the trainer's layouts, and each learner program lowers to the same text on them as on the
    trainer's arrays and placed rows."""
    overrides = ["train.batch_size=8", "train.micro_batch_size=4", "sampling.max_new_tokens=8",
                 f"rl.value_model={value_model}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    config = load_config(CONFIGS / "tiny.py", overrides)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    tasks = load_tasks(config.data, "train")[:4]
    trainer = RLTrainer(config, init_model(config.model, seed=1), tokenizer_from_name("tiny"), workdir=tmp_path,
                        train_tasks=tasks, mesh=mesh)

    params = aot.abstract_placed(nnx.split(init_model(config.model))[1], mesh, "train")
    tx, value_tx = optimizers(config)
    opt_state = aot.abstract_opt_state(tx, params, mesh)

    def same_layout(abstract, real):  # leaf by leaf (the real state wraps its arrays in nnx.Param)
        assert len(jax.tree.leaves(abstract)) == len(jax.tree.leaves(real))
        for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
            assert (a.shape, a.dtype) == (r.shape, r.dtype)
            assert a.sharding.is_equivalent_to(r.sharding, len(a.shape)), (a.sharding, r.sharding)

    same_layout(params, trainer.params)
    same_layout(opt_state, trainer.opt_state)
    value = {}
    if value_model:
        value_params = aot.abstract_placed(nnx.split(nnx.eval_shape(lambda: ValueModel(config.model, rngs=nnx.Rngs(0))))[1],
                                           mesh, "train")
        value = {"value_graphdef": trainer.value_graphdef, "value_params": value_params,
                 "value_opt_state": aot.abstract_opt_state(value_tx, value_params, mesh)}
        same_layout(value["value_params"], trainer.value_params)
        same_layout(value["value_opt_state"], trainer.value_opt_state)
    programs = rl_programs(config, mesh, trainer.graphdef, params, opt_state, prompt_length=32, **value)
    assert set(programs) == {"old_logprobs", "policy_update"} | ({"old_values", "value_update"} if value_model else set())

    # rows as a step builds them: random responses with a trace, at the prompt bucket 32
    rng = np.random.default_rng(0)
    responses = [rng.integers(5, 500, size=n).tolist() for n in (3, 8, 5, 6)]
    traces = [np.arange(1, len(r) + 1) for r in responses]
    rows = build_step_rows(config, [[7, 8, 9]] * 4, responses, traces, 32, rng).rows
    l1 = config.sampling.max_new_tokens
    per_token = rng.normal(size=(config.train.batch_size, l1)).astype(np.float32)
    forward_rows = trainer.place(jax.tree.map(lambda x: x[: forward_batch_size(config)], rows))
    update_rows = trainer.place(jax.tree.map(lambda x: x[: config.train.batch_size], rows))
    extra = {"old_logp": per_token, "advantages": per_token if value_model else per_token[:, 0]}
    real = {"old_logprobs": (trainer.graphdef, trainer.params, forward_rows),
            "policy_update": (trainer.params, trainer.opt_state, update_rows, trainer.place(extra))}
    if value_model:
        real["old_values"] = (trainer.value_graphdef, trainer.value_params, forward_rows)
        real["value_update"] = (trainer.value_params, trainer.value_opt_state, update_rows,
                                trainer.place({"old_values": per_token, "returns": per_token}))
    trainer_calls = {"old_logprobs": programs["old_logprobs"][0], "policy_update": trainer.policy_step,
                     "old_values": programs.get("old_values", (None,))[0], "value_update": getattr(trainer, "value_step", None)}
    for name, (fn, args, kwargs) in programs.items():
        assert fn.lower(*args, **kwargs).as_text() == trainer_calls[name].lower(*real[name]).as_text(), name


def test_eval_programs_count_the_loaded_weights_only_when_the_sampler_copies_them():
    # float32 weights: the sampler streams a bfloat16 copy, the loaded float32 weights stay resident
    # (all but the final norm, which the sampler streams as it is: 64 float32 scales)
    base = ["model.head_dim=128", "model.num_heads=2", "model.num_kv_heads=1", "model.compute_dtype=bfloat16",
            "eval.chunk_tasks=4", "sampling.max_active=2", "sampling.max_new_tokens=8"]
    config = aot.for_tpu(load_config(CONFIGS / "tiny.py", base))
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), aot.tpu_devices("v5e:2x2"))
    run = aot.run_programs(config, mesh, "eval")
    assert set(run.resident.values()) == {aot.bytes_per_chip(aot.abstract_placed(
        nnx.split(init_model(config.model))[1], mesh, "train")) - 64 * 4}
    # bfloat16 weights in the layout the sampler streams: nothing beside them
    bf16 = aot.for_tpu(load_config(CONFIGS / "tiny.py", [*base, "model.param_dtype=bfloat16"]))
    assert set(aot.run_programs(bf16, mesh, "eval").resident.values()) == {0}


def test_aot_rejects_bad_topologies_and_configs_without_a_slice(capsys):
    tiny = f"--config={CONFIGS / 'tiny.py'}"
    with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
        aot.tpu_devices("v9:2x2")
    capsys.readouterr()
    # through the command: user errors (exit 2, the slice named), before any compile
    assert cli.main(["aot", tiny, "--topology", "v9:2x2"]) == 2
    assert "unknown TPU generation 'v9'" in capsys.readouterr().err
    assert cli.main(["aot", tiny, "--topology", "v5p:big"]) == 2
    assert "expected GENERATION:AxB" in capsys.readouterr().err
    assert cli.main(["aot", tiny]) == 2  # no mesh.slices and no --topology: a user error
    assert "mesh.slices: the config names no TPU slice; pass --topology" in capsys.readouterr().err
    assert aot.default_command(str(CONFIGS / "trado_4b.py")) == "eval"
    assert aot.default_command(str(CONFIGS / "rl_trado_4b.py")) == "rl"


SHIPPED = sorted(p.name for p in CONFIGS.glob("*.py") if load_config(p).mesh.slices)


def test_every_rl_and_trado_config_names_its_slices():
    assert {"trado_4b.py", "trado_8b.py", "rl_trado_4b.py", "rl_trado_8b.py", "rl_trado_4b_value.py",
            "rl_sdar_code.py", "rl_trado_8b_thinking.py"} <= set(SHIPPED)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_lowers_for_every_slice_it_names(name):
    """Every program of the config's run, with its own mesh, shapes and concurrency, lowered for
    every slice in `mesh.slices` with 2 of its layers (the only change). Lowering traces the real
    functions on the slice's abstract devices: shapes, sharding specs and mesh axes must agree.
    Compiling them (HBM fit, SPMD partitioning, Mosaic) takes minutes per program at full width on
    2 cores: the tiny RL step above compiles every program kind here, tests/test_tpu_compile.py the
    kernels at real head sizes, and `benchmarks/aot_report.py` every config at full size (README,
    "Does it fit?")."""
    config = aot.for_tpu(load_config(CONFIGS / name, ["model.num_layers=2"]))
    command = aot.default_command(str(CONFIGS / name))
    for topology in config.mesh.slices:
        chips = int(np.prod([int(d) for d in topology.split(":")[1].split("x")]))
        mesh = make_mesh(config.mesh, aot.tpu_devices(topology))
        assert mesh.size == chips
        run = aot.run_programs(config, mesh, command)
        names = set(run.programs)
        if command == "rl":  # (the full-attention sampler's rollout is one "generate" program)
            assert any(n.startswith("rollout/") for n in names), names
            assert {"old_logprobs", "policy_update"} <= names | set(run.not_compiled)
            if config.model.family == "sdar":
                assert RL_PROGRAMS <= names
        assert any(n.startswith("eval/") for n in names), names
        for program, (fn, args, kwargs) in run.programs.items():
            text = fn.lower(*args, **kwargs).as_text()
            assert f"mhlo.num_partitions = {chips}" in text, (topology, program)


@pytest.mark.slow
def test_headline_config_compiles_for_its_slice():
    """rl_trado_4b (the README's TraDo run) through the real TPU compiler for its first slice, with 2
    of its layers (the layers are scanned: compile time hardly depends on their number): the
    rollout's decode step (the Pallas kernels, the KV cache) and the policy update, with its mesh,
    shapes and concurrency. The other programs are `benchmarks/aot_report.py`'s, at full depth."""
    config = aot.for_tpu(load_config(CONFIGS / "rl_trado_4b.py", ["model.num_layers=2"]))
    topology = config.mesh.slices[0]
    mesh, run, results = aot.compile_for_slice(config, topology, "rl", only=("rollout/decode", "policy_update"))
    assert {r.name for r in results} == {"rollout/decode", "policy_update"}
    hbm = aot.HBM_GIB[topology.split(":")[0]] * 2**30
    assert all(aot.fits(r, hbm) for r in results), [(r.name, r.error, r.total_bytes) for r in results]
    # the rollout's KV cache is written in place, and the update takes the trainer's state in place
    by_name = {r.name: r for r in results}
    assert by_name["rollout/decode"].alias_bytes > 0 and by_name["policy_update"].alias_bytes > 0
