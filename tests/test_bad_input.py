"""Every command answers malformed input with exit code 2 and a message naming the field, file and
line (or byte), never a traceback: data files, config files and overrides, tokenizers, checkpoints.

Most cases run `tradojax.cli.main` in-process (the same code path as the console script, without
paying a JAX import per case); a few run the real command line in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tradojax import cli

REPO = Path(__file__).resolve().parents[1]
TINY = f"--config={REPO / 'configs' / 'tiny.py'}"
RL_TINY = f"--config={REPO / 'configs' / 'rl_tiny.py'}"
GOOD_MATH = json.dumps({"question": "1+1?", "ground_truth_answer": "2"}).encode() + b"\n"
DEEP = b"[" * 100_000 + b"]" * 100_000
# a well-formed Hugging Face config.json of a tiny SDAR model (its weights vary per case)
HF_CONFIG = json.dumps({"model_type": "sdar", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                        "tie_word_embeddings": False, "eos_token_id": 1, "pad_token_id": 0, "mask_token_id": 3,
                        "torch_dtype": "float32"})


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _tokenizer_without_special_tokens(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A directory of malformed inputs (names used by the CASES table)."""
    d = tmp_path_factory.mktemp("bad")
    files: dict[str, bytes | str] = {
        "utf8.jsonl": GOOD_MATH + b'{"question": "\xff\xfe", "ground_truth_answer": "2"}\n',
        "utf8.json": b"[" + GOOD_MATH + b', {"question": "\xc3\x28", "ground_truth_answer": "1"}]',
        "deep.json": DEEP,
        "deep.jsonl": GOOD_MATH + DEEP + b"\n",
        "deep_field.jsonl": b'{"question": ' + DEEP + b', "ground_truth_answer": "1"}\n',
        "huge_int.jsonl": b'{"question": "q", "ground_truth_answer": ' + b"9" * 5000 + b"}\n",
        "garbage.parquet": b"PAR1" + bytes(range(256)) + b"PAR1",
        "empty.parquet": b"",
        "top_dict.json": '{"question": "q"}',
        "nan.jsonl": '{"question": "q", "ground_truth_answer": NaN}\n',
        "sft_utf8.jsonl": b'{"prompt": "\xff", "response": "x"}\n',
        "prompts_utf8.txt": b"hello\n\xff\xfe\n",
        "prompts_deep.jsonl": DEEP + b"\n",
        "trace_utf8.jsonl": b'{"token_ids": [1], "step_map": [1], "prompt": "\xff"}\n',
        "trace_deep.jsonl": DEEP + b"\n",
        "cfg_raises.py": "def get_config():\n    raise RuntimeError('boom in get_config')\n",
        "cfg_exit_on_import.py": "import sys\nsys.exit(3)\n",
        "cfg_exit_in_get.py": "import sys\ndef get_config():\n    sys.exit(3)\n",
        "cfg_recursion.py": "def get_config():\n    return get_config()\n",
        "cfg_none.py": "def get_config():\n    return None\n",
        "cfg_syntax.py": "def get_config(:\n",
        "cfg_no_function.py": "get_config = 3\n",
        "cfg_utf8.py": b"x = '\xff'\ndef get_config():\n    return {}\n",
        "tok_garbled/tokenizer.json": "{not json",
        "tok_garbled/tokenizer_config.json": "{}",
        "hf_deep/config.json": DEEP,
        "hf_garbled/config.json": "{not json",
        "hf_list/config.json": "[1, 2]",
        "hf_utf8/config.json": b'{"model_type": "\xff"}',
        "hf_types/config.json": json.dumps({"model_type": "sdar", "hidden_size": "big"}),
        "hf_unknown_type/config.json": json.dumps(dict(json.loads(HF_CONFIG), model_type="gpt2")),
        "hf_no_weights/config.json": HF_CONFIG,
        "hf_garbled_weights/config.json": HF_CONFIG,
        # a safetensors file: an 8-byte header length, then a header that is not JSON
        "hf_garbled_weights/model.safetensors": (16).to_bytes(8, "little") + b"{not json at all" + bytes(64),
        "run/checkpoints/5/junk": "x",  # a damaged checkpoint
        "a_file": "not a directory",
    }
    for name, content in files.items():
        _write(d / name, content)
    (d / "tok_empty").mkdir()
    (d / "data_dir.json").mkdir()
    _tokenizer_without_special_tokens(d / "tok_no_special")
    return d


# (argv with {d} for the fixture directory, fragments stderr must contain)
CASES = {
    # data files through every command that reads one
    "rl: invalid UTF-8 in jsonl": (["rl", TINY, "--config.data.train={d}/utf8.jsonl"],
                                   ["utf8.jsonl: line 2: invalid UTF-8 at column 15"]),
    "rl: invalid UTF-8 in json": (["rl", TINY, "--config.data.train={d}/utf8.json"], ["utf8.json: line 2: invalid UTF-8 at byte"]),
    "rl: 100000-deep json": (["rl", TINY, "--config.data.train={d}/deep.json"],
                             ["deep.json: line 1: JSON nested 100000 levels deep"]),
    "rl: 100000-deep jsonl line": (["rl", TINY, "--config.data.train={d}/deep.jsonl"], ["deep.jsonl: line 2: JSON nested"]),
    "rl: deep json in a field": (["rl", TINY, "--config.data.train={d}/deep_field.jsonl"],
                                 ["deep_field.jsonl: line 1: JSON nested 100001 levels deep"]),
    "rl: 5000-digit integer": (["rl", TINY, "--config.data.train={d}/huge_int.jsonl"],
                               ["huge_int.jsonl: line 1: invalid JSON", "4300 digits"]),
    "rl: garbage parquet": (["rl", TINY, "--config.data.train={d}/garbage.parquet"], ["garbage.parquet: unreadable parquet"]),
    "rl: empty parquet": (["rl", TINY, "--config.data.train={d}/empty.parquet"], ["empty.parquet: unreadable parquet"]),
    "rl: json object at the top": (["rl", TINY, "--config.data.train={d}/top_dict.json"], ["top_dict.json: expected a JSON list"]),
    "rl: NaN answer": (["rl", TINY, "--config.data.train={d}/nan.jsonl"],
                       ["nan.jsonl: line 1: field 'ground_truth_answer'"]),
    "rl: a directory named .json": (["rl", TINY, "--config.data.train={d}/data_dir.json"], ["data_dir.json: file does not exist"]),
    "rl: unsupported suffix": (["rl", TINY, "--config.data.train={d}/a_file"], ["a_file: unsupported file type ''"]),
    "eval: invalid UTF-8": (["eval", TINY, "--data={d}/utf8.jsonl"], ["utf8.jsonl: line 2: invalid UTF-8"]),
    "eval: 100000-deep json": (["eval", TINY, "--data={d}/deep.json"], ["deep.json: line 1: JSON nested"]),
    "eval: math file as code": (["eval", TINY, "--data={d}/nan.jsonl", "--kind=code"],
                                ["nan.jsonl: line 1: field 'test_method'"]),
    "sft: invalid UTF-8": (["sft", TINY, "--data={d}/sft_utf8.jsonl", "--workdir={d}/sft"],
                           ["sft_utf8.jsonl: line 1: invalid UTF-8 at column 13"]),
    "sft: 100000-deep json": (["sft", TINY, "--data={d}/deep.json", "--workdir={d}/sft"], ["deep.json: line 1: JSON nested"]),
    "sft: garbage parquet": (["sft", TINY, "--data={d}/garbage.parquet", "--workdir={d}/sft"], ["garbage.parquet"]),
    "demo: 100000-deep json": (["demo", "--config.data.train={d}/deep.json", "--out={d}/demo"], ["deep.json: line 1: JSON nested"]),
    "sample: prompts file with invalid UTF-8": (["sample", TINY, "--prompts-file={d}/prompts_utf8.txt"],
                                                ["prompts_utf8.txt: line 2: invalid UTF-8 at byte 6"]),
    "sample: 100000-deep prompts file": (["sample", TINY, "--prompts-file={d}/prompts_deep.jsonl"],
                                         ["prompts_deep.jsonl: line 1: JSON nested"]),
    "sample: prompts file that is a JSON object": (["sample", TINY, "--prompts-file={d}/top_dict.json"],
                                                   ["top_dict.json: expected a JSON list of prompts"]),
    "trace-view: invalid UTF-8": (["trace-view", TINY, "--from={d}/trace_utf8.jsonl", "--out={d}/t.html"],
                                  ["trace_utf8.jsonl: line 1: invalid UTF-8"]),
    "trace-view: 100000-deep record": (["trace-view", TINY, "--from={d}/trace_deep.jsonl", "--out={d}/t.html"],
                                       ["trace_deep.jsonl: line 1: JSON nested"]),
    "trace-view: record of the wrong shape": (["trace-view", TINY, "--from={d}/nan.jsonl", "--out={d}/t.html"],
                                              ["nan.jsonl: line 1: missing list field 'token_ids'"]),
    # config files
    "rl: get_config() raises": (["rl", "--config={d}/cfg_raises.py"],
                                ["cfg_raises.py: get_config() raised RuntimeError: boom in get_config"]),
    "demo: get_config() raises": (["demo", "--config={d}/cfg_raises.py", "--out={d}/demo"], ["cfg_raises.py: get_config() raised"]),
    "aot: get_config() raises": (["aot", "--config={d}/cfg_raises.py", "--topology=v5e:2x2"], ["cfg_raises.py: get_config() raised"]),
    "aot: unknown TPU generation": (["aot", TINY, "--topology=v9:2x2"], ["--topology 'v9:2x2'", "unknown TPU generation"]),
    "aot: malformed slice shape": (["aot", TINY, "--topology=v5e:2by2"], ["--topology 'v5e:2by2'", "AxB"]),
    "rl: sys.exit() on import": (["rl", "--config={d}/cfg_exit_on_import.py"], ["cfg_exit_on_import.py failed to import: SystemExit"]),
    "sft: sys.exit() in get_config": (["sft", "--config={d}/cfg_exit_in_get.py", "--synthetic=4"],
                                      ["cfg_exit_in_get.py: get_config() raised SystemExit"]),
    "eval: get_config() recurses forever": (["eval", "--config={d}/cfg_recursion.py"], ["cfg_recursion.py: get_config() raised RecursionError"]),
    "sample: get_config() returns None": (["sample", "--config={d}/cfg_none.py", "--prompt=hi"],
                                          ["cfg_none.py: get_config() must return a ConfigDict"]),
    "rl: config syntax error": (["rl", "--config={d}/cfg_syntax.py"], ["cfg_syntax.py failed to import: SyntaxError", "line 1"]),
    "rl: get_config not a function": (["rl", "--config={d}/cfg_no_function.py"], ["cfg_no_function.py has no get_config() function"]),
    "rl: config with invalid UTF-8": (["rl", "--config={d}/cfg_utf8.py"], ["cfg_utf8.py failed to import", "0xff"]),
    "rl: config file missing": (["rl", "--config={d}/nowhere.py"], ["nowhere.py does not exist"]),
    # overrides
    "rl: override into an int": (["rl", RL_TINY, "--config.rl.steps.x=1"], ["rl.steps.x: rl.steps = 20 is a value"]),
    "rl: override into an unset int": (["rl", TINY, "--config.train.steps.x=1"], ["train.steps: expected int, got dict"]),
    "rl: override into a string": (["rl", TINY, "--config.tokenizer.x=3"], ["tokenizer.x: tokenizer = 'tiny' is a value"]),
    "demo: override into a list": (["demo", "--config.sampling.prompt_buckets.0=3", "--out={d}/demo"],
                                   ["sampling.prompt_buckets.0: sampling.prompt_buckets = [48, 64] is a value"]),
    "rl: empty field name": (["rl", RL_TINY, "--config.model..x=1"], ["'model..x' is not a dotted field name"]),
    "rl: empty override key": (["rl", RL_TINY, "--config.=1"], ["'' is not a dotted field name"]),
    "rl: override without a value": (["rl", RL_TINY, "--config.rl.steps"], ["--config.rl.steps: missing value"]),
    "rl: inf for an int": (["rl", RL_TINY, "--config.rl.steps=1e999"], ["rl.steps"]),
    "rl: unknown field": (["rl", TINY, "--config.rl.stpes=3"], ["rl.stpes: unknown field"]),
    "rl: a section set to a number": (["rl", RL_TINY, "--config.model=3"], ["model"]),
    "sample: vocab past int32": (["sample", TINY, "--config.model.vocab_size=100000000000", "--prompt=hi"],
                                 ["model.vocab_size: must be < 2**31"]),
    "rl: mesh larger than the devices": (["rl", TINY, "--config.mesh.data=3", "--config.mesh.fsdp=3", "--workdir={d}/rl"],
                                         ["mesh: data*fsdp*tensor = 9"]),
    "rl: more synthetic tasks than exist": (["rl", TINY, "--config.data.synthetic_train_size=100000", "--workdir={d}/rl"],
                                            ["data.synthetic_train_size=100000", "found only 345 distinct questions"]),
    "eval: more synthetic tasks than exist": (["eval", TINY, "--config.data.synthetic_eval_size=5000"],
                                              ["data.synthetic_train_size=256, synthetic_eval_size=5000"]),
    # tokenizers
    "rl: missing tokenizer directory": (["rl", TINY, "--config.tokenizer={d}/no_such_tokenizer", "--workdir={d}/rl"],
                                        ["tokenizer: tokenizer directory", "no_such_tokenizer' does not exist"]),
    "rl: garbled tokenizer": (["rl", TINY, "--config.tokenizer={d}/tok_garbled", "--workdir={d}/rl"],
                              ["tokenizer: could not load the tokenizer in", "tok_garbled"]),
    "rl: empty tokenizer directory": (["rl", TINY, "--config.tokenizer={d}/tok_empty", "--workdir={d}/rl"],
                                      ["tok_empty' has none of tokenizer.json"]),
    "rl: tokenizer without mask/EOS": (["rl", TINY, "--config.tokenizer={d}/tok_no_special", "--workdir={d}/rl"],
                                       ["tokenizer:", "tok_no_special' has no mask token"]),
    "rl: tokenizer and model disagree": (["rl", TINY, "--config.model.mask_token_id=5", "--workdir={d}/rl"],
                                         ["model.mask_token_id: 5 but the tokenizer's mask token is 3"]),
    "eval: tokenizer without mask/EOS": (["eval", TINY, "--config.tokenizer={d}/tok_no_special"], ["tok_no_special' has no mask token"]),
    "eval: tokenizer and model disagree": (["eval", TINY, "--config.model.eos_token_id=7", "--config.data.synthetic_eval_size=2"],
                                           ["model.eos_token_id: 7 but the tokenizer's eos token is 0"]),
    "sft: tokenizer without mask/EOS": (["sft", TINY, "--synthetic=4", "--config.tokenizer={d}/tok_no_special",
                                         "--workdir={d}/sft"], ["tok_no_special' has no mask token"]),
    "sft: tokenizer and model disagree": (["sft", TINY, "--synthetic=4", "--config.model.mask_token_id=5", "--workdir={d}/sft"],
                                          ["model.mask_token_id: 5 but the tokenizer's mask token is 3"]),
    "sample: missing tokenizer directory": (["sample", TINY, "--prompt=hi", "--config.tokenizer={d}/no_such_tokenizer"],
                                            ["no_such_tokenizer' does not exist"]),
    "demo: garbled tokenizer": (["demo", "--config.tokenizer={d}/tok_garbled", "--out={d}/demo"], ["tok_garbled"]),
    # checkpoints
    "import-hf: missing directory": (["import-hf", "{d}/no_such_hf", "--out={d}/imported"], ["no_such_hf: no such checkpoint"]),
    "import-hf: 100000-deep config.json": (["import-hf", "{d}/hf_deep", "--out={d}/imported"],
                                           ["hf_deep/config.json: not valid JSON (RecursionError"]),
    "import-hf: garbled config.json": (["import-hf", "{d}/hf_garbled", "--out={d}/imported"], ["hf_garbled/config.json: not valid JSON"]),
    "import-hf: config.json is a list": (["import-hf", "{d}/hf_list", "--out={d}/imported"], ["hf_list/config.json: expected a JSON object"]),
    "import-hf: invalid UTF-8 in config.json": (["import-hf", "{d}/hf_utf8", "--out={d}/imported"], ["hf_utf8/config.json: not valid JSON"]),
    "import-hf: wrong type in config.json": (["import-hf", "{d}/hf_types", "--out={d}/imported"],
                                             ["hf_types/config.json: field 'hidden_size'"]),
    "import-hf: unknown model_type": (["import-hf", "{d}/hf_unknown_type", "--out={d}/imported"],
                                      ["hf_unknown_type/config.json: unknown model_type 'gpt2'"]),
    "import-hf: no weights": (["import-hf", "{d}/hf_no_weights", "--out={d}/imported"],
                              ["hf_no_weights: no *.safetensors files"]),
    "import-hf: garbled safetensors": (["import-hf", "{d}/hf_garbled_weights", "--out={d}/imported"],
                                       ["hf_garbled_weights/model.safetensors: cannot read this safetensors file"]),
    "import-hf: --out missing": (["import-hf", "{d}/hf_no_weights"], ["the following arguments are required: --out"]),
    "export-hf: garbled safetensors": (["export-hf", "{d}/hf_garbled_weights", "{d}/exported"],
                                       ["hf_garbled_weights/model.safetensors: cannot read this safetensors file"]),
    "export-hf: unknown model_type": (["export-hf", "{d}/hf_unknown_type", "{d}/exported"],
                                      ["unknown model_type 'gpt2'"]),
    "export-hf: bad --max-shard-size": (["export-hf", "{d}/hf_no_weights", "{d}/exported", "--max-shard-size=lots"],
                                        ["invalid size 'lots'"]),
    "export-hf: missing model": (["export-hf", "{d}/no_such_model", "{d}/exported"], ["no_such_model: no such checkpoint"]),
    "export-hf: 100000-deep config.json": (["export-hf", "{d}/hf_deep", "{d}/exported"], ["hf_deep/config.json: not valid JSON"]),
    "export-hf: not a model": (["export-hf", "{d}/tok_garbled", "{d}/exported"], ["tok_garbled: not a model"]),
    "export-hf: output is a file": (["export-hf", "{d}/hf_types", "{d}/a_file"], ["a_file"]),
    "sample: 100000-deep hf_checkpoint config": (["sample", TINY, "--config.hf_checkpoint={d}/hf_deep", "--prompt=hi"],
                                                 ["hf_deep/config.json: not valid JSON"]),
    "rl: hf_checkpoint with a wrong type": (["rl", TINY, "--config.hf_checkpoint={d}/hf_types", "--workdir={d}/rl"],
                                            ["hf_types/config.json: field 'hidden_size'"]),
    "sft: resume from a damaged checkpoint": (["sft", TINY, "--synthetic=4", "--workdir={d}/run", "--resume"],
                                              ["checkpoints/5"]),
    "rl: resume from a damaged checkpoint": (["rl", TINY, "--workdir={d}/run", "--resume"], ["checkpoints/5", "damaged"]),
}


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_gets_a_clear_error(name, bad, capsys):
    template, fragments = CASES[name]
    argv = [arg.replace("{d}", str(bad)) for arg in template]
    start = time.monotonic()
    code, printed = _run_in_process(argv, capsys)
    elapsed = time.monotonic() - start
    assert code == 2, f"{name}: exit code {code}\n{printed[-2000:]}"
    assert "Traceback" not in printed
    for fragment in fragments:
        assert fragment in printed, f"{name}: {fragment!r} not in:\n{printed[-2000:]}"
    # refused at once, not after training (a loaded 2-core box compiles slowly: generous)
    assert elapsed < 120, f"{name} took {elapsed:.0f} s"


def test_table_covers_every_command():
    commands = {template[0] for template, _ in CASES.values()}
    assert commands == {"rl", "eval", "sft", "demo", "sample", "trace-view", "aot", "import-hf", "export-hf"}
    assert len(CASES) >= 70


# Through the real command line: the exit status and stderr a user sees, for a few cases.
SUBPROCESS_CASES = ["rl: get_config() raises"] + [
    pytest.param(name, marks=pytest.mark.slow)
    for name in ("eval: 100000-deep json", "import-hf: 100000-deep config.json", "export-hf: garbled safetensors",
                 "rl: override into an int")]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_command_line_exit_code_and_message(name, bad):
    template, fragments = CASES[name]
    argv = [arg.replace("{d}", str(bad)) for arg in template]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "tradojax.cli", *argv], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
