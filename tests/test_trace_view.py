"""The trace viewer page, its replay logic (run in node when present), and the sample/trace-view CLI."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tradojax import cli
from tradojax.data.tokenizer import build_tiny_tokenizer
from tradojax.sampling.commands import CommandError, read_prompts_file, sample_main, trace_view_main
from tradojax.sampling.trace_view import REPLAY_SCRIPT, token_pieces, trace_page

TOKENIZER = build_tiny_tokenizer()
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def embedded_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    assert match, "no embedded trace data"
    return json.loads(match.group(1))


def test_token_pieces_join_to_the_decoded_text():
    ids = TOKENIZER.encode("héllo 漢字<|im_end|> x", add_special_tokens=False)
    pieces, special = token_pieces(TOKENIZER, ids + [500])
    assert "".join(pieces[:-1]) == TOKENIZER.decode(ids)
    assert pieces[-1] == "<|id 500|>" and special[-1]  # outside the tokenizer's 416 ids
    assert [p for p, s in zip(pieces, special) if s] == ["<|im_end|>", "<|id 500|>"]
    assert "漢" in pieces and "字" in pieces  # multi-byte characters land on the completing token
    cut = ids[: ids.index(TOKENIZER.convert_tokens_to_ids("<|im_end|>")) - 1]  # ends inside "字"
    assert "".join(token_pieces(TOKENIZER, cut)[0]) == TOKENIZER.decode(cut)


def test_page_embeds_the_trace_and_escapes_text():
    nasty = "</script><script>alert(1)</script>"
    pieces = ["a", nasty, " __SCRIPT__", "<|im_end|>"]
    page = trace_page(pieces, [2, 1, 3, 3], [False, False, False, True], title="t <b>", prompt="Q: 1+1 & </pre>",
                      meta={"block size": 4})
    data = embedded_data(page)
    assert data["pieces"] == pieces and data["steps"] == [2, 1, 3, 3]
    assert data["is_special"] == [False, False, False, True]
    assert data["prompt"] == "Q: 1+1 & </pre>" and data["meta"] == {"block size": "4"}
    assert nasty not in page and "<title>t &lt;b&gt;</title>" in page
    assert page.count("<script") == 2  # the data and the replay script, nothing injected
    for element in ('id="step" type="range"', 'id="play"', 'id="speed"', 'id="hide-special" type="checkbox"'):
        assert element in page
    assert "http://" not in page and "https://" not in page  # self-contained


@pytest.mark.parametrize("steps, special, message", [
    ([1, 2], None, "same length"),
    ([1, 2, 3], [True], "is_special"),
    ([0, 1, 2], None, ">= 1"),
])
def test_page_rejects_inconsistent_traces(steps, special, message):
    with pytest.raises(ValueError, match=message):
        trace_page(["a", "b", "c"], steps, special)


NODE_HARNESS = r"""
// A minimal DOM: enough for init() to build the page and for the test to drive it.
const elements = {};
function element(id) {
  return elements[id] || (elements[id] = {
    id, value: "0", max: "0", checked: false, textContent: "", className: "", title: "", children: [],
    listeners: {},
    addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); },
    appendChild(child) { this.children.push(child); },
    click() { (this.listeners.click || []).forEach(fn => fn()); },
    fire(type) { (this.listeners[type] || []).forEach(fn => fn({key: "", preventDefault() {}})); },
  });
}
globalThis.document = {
  readyState: "complete",
  getElementById: element,
  createElement: () => element("span" + Object.keys(elements).length),
  addEventListener() {},
};
element("trace-data").textContent = DATA;
element("speed").value = "200";
globalThis.setInterval = () => 1; globalThis.clearInterval = () => {};
SCRIPT
const out = {};
out.pure = tokenStates([1, 3, 2, 3], [false, true, false, false], 2, true);
const spans = element("tokens").children;
const snap = () => spans.map(s => [s.className, s.textContent]);
out.max = element("step").max;
out.at0 = snap();
element("step").value = "2"; element("step").fire("input");
out.at2 = snap();
out.label = element("step-label").textContent;
element("hide-special").checked = true; element("hide-special").fire("change");
out.at2hidden = snap();
element("step").value = "3"; element("play").click();  // at the end: play restarts from 0
out.afterPlay = [element("step").value, element("play").textContent];
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the page's script is not run")
def test_replay_script_in_node():
    data = {"pieces": ["A", "<s>", "b", "c"], "steps": [1, 3, 2, 3], "is_special": [False, True, False, False],
            "prompt": "p", "meta": {}}
    program = NODE_HARNESS.replace("DATA", json.dumps(json.dumps(data))).replace("SCRIPT", REPLAY_SCRIPT)
    result = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["pure"] == ["shown", "hidden", "new", "masked"]
    assert out["max"] == "3"
    assert out["at0"] == [["tok masked", "|<MASK>|"]] * 4
    assert out["at2"] == [["tok shown", "A"], ["tok masked", "|<MASK>|"], ["tok new", "b"], ["tok masked", "|<MASK>|"]]
    assert out["label"] == "step 2 / 3"
    assert out["at2hidden"][1] == ["tok hidden", ""]
    assert out["afterPlay"][0] == "0" and "pause" in out["afterPlay"][1]


# ----------------------------------------------------------------------------------------------
# Prompts files and the commands
# ----------------------------------------------------------------------------------------------


def test_read_prompts_file_formats(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("What is 1+1?\n\n  Name a prime.\n")
    assert read_prompts_file(plain) == ["What is 1+1?", "  Name a prime."]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"question": "q1", "answer": "2"}\n{"prompt": "q2"}\n"q3"\n')
    assert read_prompts_file(jsonl) == ["q1", "q2", "q3"]
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"question": "a"}, "b"]))
    assert read_prompts_file(as_json) == ["a", "b"]


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"bad.jsonl: line 2: invalid JSON"),
    ("bad.jsonl", '{"prompt": "a"}\n{"answer": "3"}\n', r"line 2: object has no string field 'prompt' or 'question'"),
    ("bad.json", '{"prompt": "a"}', "expected a JSON list"),
    ("empty.txt", "\n\n", "holds no prompts"),
])
def test_read_prompts_file_errors_name_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CommandError, match=message):
        read_prompts_file(path)


def test_sample_then_trace_view(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "What is 2+3?"}\n{"question": "Name a prime."}\n')
    output = tmp_path / "out.jsonl"
    args = ["--config", TINY, "--config.sampling.max_new_tokens=8", "--config.sampling.num_samples=2",
            "--prompts-file", str(prompts), "--prompt", "Hi", "--output", str(output), "--no-progress"]
    assert sample_main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("=== prompt") == 6 and "--- 6 responses" in printed
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert [r["prompt"] for r in records[::2]] == ["Hi", "What is 2+3?", "Name a prime."]
    for record in records:
        n = len(record["token_ids"])
        assert 1 <= n <= 8 and len(record["step_map"]) == n == len(record["logprobs"])
        assert all(step >= 1 for step in record["step_map"]) and record["denoising_steps"] >= max(record["step_map"])
        assert all(lp <= 0 for lp in record["logprobs"])
        assert record["response"] == TOKENIZER.decode(record["token_ids"], skip_special_tokens=True)

    page = tmp_path / "trace.html"
    assert trace_view_main(["--config", TINY, "--from", str(output), "--row", "3",
                            "--out", str(page)]) == 0
    data = embedded_data(page.read_text())
    assert data["steps"] == records[3]["step_map"]
    assert data["pieces"] == token_pieces(TOKENIZER, records[3]["token_ids"])[0]
    assert data["prompt"] == records[3]["prompt"]

    sampled_page = tmp_path / "sampled.html"
    assert trace_view_main(["--config", TINY, "--config.sampling.max_new_tokens=8", "--prompt", "What is 2+3?",
                            "--out", str(sampled_page)]) == 0
    data = embedded_data(sampled_page.read_text())
    assert 1 <= len(data["pieces"]) == len(data["steps"]) <= 8
    assert data["prompt"].startswith("<|im_start|>user\nWhat is 2+3?<|im_end|>")
    assert data["meta"]["block size"] == "4"

    assert cli.main(["trace-view", "--config", TINY, "--from", str(output), "--row", "9", "--out", str(page)]) == 2
    assert "--row 9 is out of range (the file has 6 records)" in capsys.readouterr().err


def test_commands_report_bad_usage(tmp_path, capsys):
    """Through the command line's entry: exit code 2 and a message naming the problem."""
    assert cli.main(["sample", "--prompt", "x"]) == 2
    assert "--config=FILE is required" in capsys.readouterr().err
    assert cli.main(["sample", "--config", TINY]) == 2
    assert "give --prompt TEXT or --prompts-file FILE" in capsys.readouterr().err
    assert cli.main(["sample", "--config", TINY, "--config.sampling.denoising_steps=9", "--prompt", "x"]) == 2
    assert "sampling.denoising_steps: must be in [1, block_size=4], got 9" in capsys.readouterr().err
    assert cli.main(["sample", "--config", TINY, f"--config.tokenizer={tmp_path / 'missing'}", "--prompt", "x"]) == 2
    assert "ConfigError: tokenizer: tokenizer directory" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"token_ids": [1, 2], "step_map": [1]}\n')
    assert cli.main(["trace-view", "--config", TINY, "--from", str(broken)]) == 2
    assert "token_ids and step_map differ in length" in capsys.readouterr().err
