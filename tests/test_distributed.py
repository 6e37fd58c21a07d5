"""Two CPU processes joined by jax.distributed run one SFT update on a process-spanning mesh and
land on the same parameters as one process running the same global batch; `tradojax rl` as two
processes takes the same steps as one process with the same mesh. Also: the launch scripts.

The file is also the worker: `python tests/test_distributed.py WORKER_ID NUM PORT OUT`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import CLI, FAST_COMPILE_XLA_FLAGS, REPO

DEVICES_PER_PROCESS = 2
NUM_PROCESSES = 2
ROWS, PROMPT_LENGTH, RESPONSE_LENGTH, MICRO_BATCHES = 8, 16, 16, 2
TIMEOUT_S = 300  # a hang guard: two JAX processes compiling on a loaded 2-core box took 220 s


def problem():
    """The tiny model, optimizer and global batch: identical, deterministic, on every process."""
    from flax import nnx

    from helpers import TINY_MODEL
    from tradojax.config import TrainConfig
    from tradojax.models.transformer import init_model
    from tradojax.training.row_masks import random_mask
    from tradojax.training.rows import pack_rows
    from tradojax.training.step import make_optimizer

    config = dataclasses.replace(TINY_MODEL, max_position_embeddings=128)
    graphdef, params = nnx.split(init_model(config, seed=3))
    # eps 1e-3: the first Adam step is lr * g / (|g| + eps), smooth in g, so float noise from a
    # different reduction order cannot flip a tiny gradient's whole +-lr step
    tx = make_optimizer(TrainConfig(learning_rate=1e-2, schedule="constant", eps=1e-3, weight_decay=0.01,
                                    max_grad_norm=1.0))
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, 512, size=rng.integers(5, PROMPT_LENGTH + 1)) for _ in range(ROWS)]
    responses = [rng.integers(4, 512, size=rng.integers(3, RESPONSE_LENGTH + 1)) for _ in range(ROWS)]
    noisy, trained = zip(*[random_mask(len(r), RESPONSE_LENGTH, lower_p=0.2, upper_p=0.8, post_num=0, rng=rng)
                           for r in responses])
    rows = pack_rows(prompts, responses, noisy, trained, prompt_length=PROMPT_LENGTH,
                     response_length=RESPONSE_LENGTH, pad_id=0, mask_id=3, block_size=4)
    return graphdef, params, tx, rows


def flat_arrays(params) -> dict[str, np.ndarray]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def worker(process_id: int, num_processes: int, port: int, out: str) -> None:
    from tradojax.parallel.distributed import initialize

    info = initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60)
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    from tradojax.parallel.mesh import AXES, batch_sharding
    from tradojax.parallel.sharding import state_shardings
    from tradojax.training.step import make_train_step, sft_loss

    jax.config.update("jax_default_matmul_precision", "highest")
    assert info.process_index == process_id and info.process_count == num_processes
    assert info.device_count == num_processes * DEVICES_PER_PROCESS == len(jax.devices())
    # fsdp spans the processes (parameters and the batch split across them), tensor within one
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices).reshape(1, num_processes, DEVICES_PER_PROCESS), AXES)

    graphdef, params, tx, rows = problem()
    leaves, treedef = jax.tree.flatten(params)
    shardings = jax.tree.leaves(state_shardings(params, mesh, "train"))
    params = jax.tree.unflatten(treedef, [
        jax.make_array_from_callback(leaf.shape, sharding, lambda index, leaf=leaf: np.asarray(leaf)[index])
        for leaf, sharding in zip(leaves, shardings, strict=True)])
    share = ROWS // num_processes  # this process's contiguous slice of the global batch

    def global_rows(x):
        local = np.asarray(x)[process_id * share:(process_id + 1) * share]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), local, x.shape)

    rows = jax.tree.map(global_rows, rows)
    gathered_rows = multihost_utils.process_allgather(rows.tokens, tiled=True)
    assert np.array_equal(gathered_rows, problem()[3].tokens), "global batch assembled out of order"
    opt_state = jax.jit(tx.init)(params)
    step = make_train_step(graphdef, tx, sft_loss, MICRO_BATCHES)
    params, opt_state, metrics = step(params, opt_state, rows)
    new = multihost_utils.process_allgather(params, tiled=True)
    if process_id == 0:
        arrays = flat_arrays(new)
        arrays["__loss__"] = np.asarray(metrics["loss"])
        arrays["__grad_norm__"] = np.asarray(metrics["grad_norm"])
        np.savez(out, **arrays)
    multihost_utils.sync_global_devices("tradojax_test_done")


def cpu_xla_flags(devices: int) -> str:
    """A worker process's XLA_FLAGS: `devices` CPU devices, compiled as the tests compile."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_XLA_FLAGS}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], envs: list[dict], timeout_s: float) -> list[str]:
    """Runs the commands side by side; fails with their output tails if one fails or they hang."""
    procs = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for command, env in zip(commands, envs)]
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0][-3000:] for p in procs]
        pytest.fail(f"the processes did not finish within {timeout_s} s:\n" + "\n----\n".join(logs))
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outputs[i][-5000:]}"
    return outputs


@pytest.mark.slow
def test_two_processes_match_one_process_update(tmp_path):
    out = tmp_path / "params.npz"
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=cpu_xla_flags(DEVICES_PER_PROCESS))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TRADOJAX_DISTRIBUTED"):
        env.pop(name, None)
    run_processes([[sys.executable, __file__, str(i), str(NUM_PROCESSES), str(port), str(out)]
                   for i in range(NUM_PROCESSES)], [env] * NUM_PROCESSES, TIMEOUT_S)

    import jax

    from tradojax.training.step import make_train_step, sft_loss

    graphdef, params, tx, rows = problem()
    before = flat_arrays(params)
    step = make_train_step(graphdef, tx, sft_loss, MICRO_BATCHES)
    new_params, _, metrics = step(params, tx.init(params), jax.tree.map(np.asarray, rows))
    reference = flat_arrays(new_params)
    distributed = dict(np.load(out))
    np.testing.assert_allclose(distributed.pop("__loss__"), metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(distributed.pop("__grad_norm__"), metrics["grad_norm"], rtol=1e-5)
    assert set(distributed) == set(reference)
    moved = 0.0
    for name, value in reference.items():
        np.testing.assert_allclose(distributed[name], value, atol=1e-5, rtol=0, err_msg=name)
        moved = max(moved, float(np.abs(value - before[name]).max()))
    assert moved > 1e-3  # the update is far larger than the tolerance: a skipped step would fail


RL_ARGS = ["rl", "--config", "configs/tiny.py", "--config.rl.steps=2", "--config.rl.num_tasks_per_step=2",
           "--config.rl.num_responses_per_task=4", "--config.train.batch_size=8", "--config.train.learning_rate=1e-3",
           "--config.train.schedule=constant", "--config.train.eps=1e-3", "--config.sampling.max_new_tokens=8",
           "--config.rl.difficulty_lower=0.0", "--config.rl.difficulty_upper=1.0", "--config.rl.reward_workers=1",
           "--config.data.synthetic_train_size=40", "--config.data.synthetic_eval_size=2", "--config.rl.eval_every=100",
           "--config.rl.save_every=1", "--config.mesh.data=2", "--config.mesh.fsdp=2"]


@pytest.mark.slow
def test_two_process_rl_run_matches_one_process(tmp_path):
    """`tradojax rl` as two processes (2 CPU devices each, joined through the JAX_* environment) on a
    (data 2, fsdp 2) mesh: the same rollouts, rewards and updates as one process with 4 devices."""
    import json

    base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TRADOJAX_DISTRIBUTED"):
        base.pop(name, None)
    port = free_port()
    two = [dict(base, XLA_FLAGS=cpu_xla_flags(DEVICES_PER_PROCESS),
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(NUM_PROCESSES), JAX_PROCESS_ID=str(i))
           for i in range(NUM_PROCESSES)]
    one = dict(base, XLA_FLAGS=cpu_xla_flags(NUM_PROCESSES * DEVICES_PER_PROCESS))
    commands = [[sys.executable, "-c", CLI, *RL_ARGS, "--workdir", str(tmp_path / "two")]] * NUM_PROCESSES
    commands.append([sys.executable, "-c", CLI, *RL_ARGS, "--workdir", str(tmp_path / "one")])
    run_processes(commands, two + [one], 2 * TIMEOUT_S)

    def metrics(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    distributed, single = metrics("two"), metrics("one")
    assert [m["step"] for m in distributed] == [1, 2] == [m["step"] for m in single]
    for a, b in zip(distributed, single):
        for key in ("reward", "response_length", "tokens_per_step", "rows", "updates"):
            assert a[key] == b[key], key
        for key in ("kl", "clip_fraction", "grad_norm", "pg_loss", "sampler_trainer_logp_gap"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert distributed[0]["updates"] > 0
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_initialize_rejects_partial_or_malformed_settings(monkeypatch):
    from tradojax.parallel import distributed

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TRADOJAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="num_processes, process_id missing"):
        distributed.initialize("127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two': must be an integer"):
        distributed.initialize("127.0.0.1:1234", process_id=0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="must be host:port"):
        distributed.initialize("localhost", process_id=0)
    with pytest.raises(ValueError, match="0 <= process_id < num_processes, got 2 and 2"):
        distributed.initialize("127.0.0.1:1234", process_id=2)
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    assert distributed.initialize_from_environment() is None  # no job described: one process
    monkeypatch.setenv("TRADOJAX_DISTRIBUTED", "yes")
    with pytest.raises(ValueError, match="TRADOJAX_DISTRIBUTED='yes'"):
        distributed.initialize_from_environment()



# ----------------------------------------------------------------------------------------------
# launch/ scripts: syntax, usage errors, and the commands they compose (gcloud and tradojax faked)
# ----------------------------------------------------------------------------------------------

LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm_create.sh", "tpu_vm_install.sh", "tpu_vm_run.sh", "gpu_run.sh", "local_run.sh"]
LAUNCH_VARS = ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "CONFIG", "WORKDIR", "PROJECT", "SPOT", "STOP", "DETACH",
               "NUM_NODES", "NODE_RANK", "COORDINATOR", "PROCESSES", "FAKE_DEVICES", "COMMAND", "REPO_URL",
               "RUNTIME_VERSION", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS",
               "XLA_FLAGS")


def recorder(tmp_path, name: str) -> tuple[Path, Path]:
    """An executable that appends its argv and the JAX_* / XLA_FLAGS variables it sees to a JSON-lines log;
    it exits 3 when JAX_PROCESS_ID equals $FAIL_PROCESS and sleeps 60 s when it equals $SLEEP_PROCESS."""
    log = tmp_path / f"{name}.jsonl"
    script = tmp_path / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('JAX_') or k == 'XLA_FLAGS'}\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': env}) + '\\n')\n"
        "me = os.environ.get('JAX_PROCESS_ID')\n"
        "if me is not None and me == os.environ.get('FAIL_PROCESS'):\n"
        "    sys.exit(3)\n"
        "if me is not None and me == os.environ.get('SLEEP_PROCESS'):\n"
        "    time.sleep(60)\n")
    script.chmod(0o755)
    return script, log


def calls(log: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in log.read_text().splitlines()]


def launch(script: str, tmp_path, args=(), timeout=30, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_is_valid_bash_and_explains_missing_settings(script, tmp_path):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    if script == "local_run.sh":
        done = launch(script, tmp_path, PROCESSES="zero")
        assert done.returncode == 2 and "PROCESSES=zero is not a positive integer" in done.stderr
    else:
        done = launch(script, tmp_path)
        missing = "CONFIG" if script == "gpu_run.sh" else "TPU_NAME"
        assert done.returncode == 2 and f"error: {missing} is not set" in done.stderr
    assert "Optional:" in done.stderr  # the usage text follows the error


def test_tpu_vm_create_composes_the_gcloud_call(tmp_path):
    gcloud, log = recorder(tmp_path, "gcloud")
    done = launch("tpu_vm_create.sh", tmp_path, TPU_NAME="trado", ZONE="us-east1-d", ACCELERATOR_TYPE="v5litepod-8",
                  SPOT="1", PROJECT="proj", GCLOUD=str(gcloud))
    assert done.returncode == 0, done.stderr
    assert calls(log)[0]["argv"] == ["compute", "tpus", "tpu-vm", "create", "trado", "--zone=us-east1-d",
                                 "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
                                 "--project=proj", "--spot"]
    done = launch("tpu_vm_create.sh", tmp_path, TPU_NAME="t", ZONE="z", ACCELERATOR_TYPE="x9-8", GCLOUD=str(gcloud))
    assert done.returncode == 2 and "no default RUNTIME_VERSION for ACCELERATOR_TYPE=x9-8" in done.stderr


def test_tpu_vm_install_copies_the_checkout_and_installs_on_every_worker(tmp_path):
    gcloud, log = recorder(tmp_path, "gcloud")
    done = launch("tpu_vm_install.sh", tmp_path, TPU_NAME="trado", ZONE="z", GCLOUD=str(gcloud))
    assert done.returncode == 0, done.stderr
    scp, ssh = (c["argv"] for c in calls(log))
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    import tarfile

    with tarfile.open(scp[4]) as archive:
        names = archive.getnames()
    assert "./pyproject.toml" in names and not any("/.venv/" in n or n.endswith("/.git") for n in names)
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "trado"] and "--worker=all" in ssh
    remote = ssh[-1].removeprefix("--command=")
    assert "uv pip install --python .venv/bin/python -e . jax\\[tpu\\]==0.10.2" in remote
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0  # the remote script parses


def test_tpu_vm_run_starts_a_resumable_distributed_job_and_stops_it(tmp_path):
    gcloud, log = recorder(tmp_path, "gcloud")
    done = launch("tpu_vm_run.sh", tmp_path, ["--config.rl.steps=3"], TPU_NAME="trado", ZONE="z",
                  CONFIG="configs/rl_trado_4b.py", WORKDIR="gs://bucket/run one", GCLOUD=str(gcloud))
    assert done.returncode == 0, done.stderr
    (start,) = (c["argv"] for c in calls(log))
    assert start[:7] == ["compute", "tpus", "tpu-vm", "ssh", "trado", "--zone=z", "--worker=all"]
    remote = start[-1].removeprefix("--command=")
    assert ("TRADOJAX_DISTRIBUTED=1 nohup .venv/bin/tradojax rl --config=configs/rl_trado_4b.py "
            "--workdir=gs://bucket/run\\ one --resume --config.rl.steps=3") in remote
    assert "echo $! > ~/tradojax-rl.pid" in remote
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0
    done = launch("tpu_vm_run.sh", tmp_path, TPU_NAME="trado", ZONE="z", STOP="1", GCLOUD=str(gcloud))
    assert done.returncode == 0, done.stderr
    stop = calls(log)[1]["argv"][-1].removeprefix("--command=")
    assert "kill -TERM $(cat ~/tradojax-rl.pid)" in stop and "tradojax rl" not in stop


def test_gpu_run_sets_the_coordinator_for_multi_node(tmp_path):
    tradojax, log = recorder(tmp_path, "tradojax")
    done = launch("gpu_run.sh", tmp_path, ["--config.rl.steps=2"], CONFIG="configs/rl_trado_8b.py", NUM_NODES="2",
                  NODE_RANK="1", COORDINATOR="10.0.0.1:12355", TRADOJAX=str(tradojax))
    assert done.returncode == 0, done.stderr
    (call,) = calls(log)
    assert {k: call["env"].get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                            "JAX_PLATFORMS")} == {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:12355", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
        "JAX_PLATFORMS": "cuda"}
    assert call["argv"] == ["rl", "--config=configs/rl_trado_8b.py", "--resume", "--config.rl.steps=2"]
    done = launch("gpu_run.sh", tmp_path, CONFIG="c.py", NUM_NODES="2", NODE_RANK="2", COORDINATOR="h:1",
                  TRADOJAX=str(tradojax))
    assert done.returncode == 2 and "NODE_RANK=2 must be in 0..1" in done.stderr
    done = launch("gpu_run.sh", tmp_path, CONFIG="c.py", NUM_NODES="2", NODE_RANK="0", TRADOJAX=str(tradojax))
    assert done.returncode == 2 and "COORDINATOR is not set" in done.stderr


def test_local_run_starts_joined_processes_and_stops_them_when_one_fails(tmp_path):
    tradojax, log = recorder(tmp_path, "tradojax")
    done = launch("local_run.sh", tmp_path, ["--config=configs/demo.py"], COMMAND="rl", PROCESSES="2",
                  FAKE_DEVICES="4", PORT="23456", TRADOJAX=str(tradojax))
    assert done.returncode == 0, done.stderr
    seen = sorted(c["env"]["JAX_PROCESS_ID"] for c in calls(log))
    assert seen == ["0", "1"]
    for c in calls(log):
        assert c["env"]["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:23456" and c["env"]["JAX_NUM_PROCESSES"] == "2"
        assert c["env"]["JAX_PLATFORMS"] == "cpu"
        assert c["env"]["XLA_FLAGS"].strip() == "--xla_force_host_platform_device_count=4"
        assert c["argv"] == ["rl", "--config=configs/demo.py"]
    start = time.monotonic()
    done = launch("local_run.sh", tmp_path, COMMAND="rl", PROCESSES="2", TRADOJAX=str(tradojax),
                  FAIL_PROCESS="0", SLEEP_PROCESS="1")
    assert done.returncode == 1 and time.monotonic() - start < 30  # process 1 was stopped, not awaited


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
