"""A self-contained HTML page that replays a decode trace (spec 2.8).

The page embeds `{pieces, steps, is_special, ...}` as JSON and replays the order in which the
sampler unmasked the response: a step slider with play/pause and a speed selector; at step t the
tokens with `step <= t` are shown, the ones revealed at exactly t are highlighted, the others are
drawn as `|<MASK>|` placeholders; a toggle hides special tokens. No network, no external files.

`token_pieces` turns ids into per-token text increments (`decode(ids[:i+1])` minus
`decode(ids[:i])`), so that multi-byte characters split over several tokens still render.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def token_pieces(tokenizer: Any, token_ids: Sequence[int]) -> tuple[list[str], list[bool]]:
    """Per-token display text and special flags for `token_ids` under a Hugging Face tokenizer.

    Each piece is what the token adds to the decoded text. A character split over several byte
    tokens shows on the token that completes it (the earlier ones are empty), so the pieces always
    join to the decoded text. Ids outside the tokenizer's vocabulary (a model's padded embedding
    rows) render as `<|id N|>` and count as special.
    """
    ids = [int(t) for t in token_ids]
    vocab_size = len(tokenizer)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            special_ids.add(int(token_id))

    def decode(some: list[int]) -> str:
        return tokenizer.decode(some, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[str] = []
    flags: list[bool] = []
    known: list[int] = []  # decodable ids so far
    emitted = ""  # decoded text already handed out in pieces
    last_known = -1  # index of the piece of the last decodable token
    for token_id in ids:
        if not 0 <= token_id < vocab_size:
            pieces.append(f"<|id {token_id}|>")
            flags.append(True)
            continue
        known.append(token_id)
        text = decode(known)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the token completing it
            piece = ""
        elif text.startswith(emitted):
            piece, emitted = text[len(emitted):], text
        else:  # a decoder that rewrites earlier text (rare): the token on its own
            piece = decode([token_id])
            emitted = text
        pieces.append(piece)
        flags.append(token_id in special_ids)
        last_known = len(pieces) - 1
    if known and last_known >= 0:
        text = decode(known)
        if text.startswith(emitted) and len(text) > len(emitted):  # bytes that never completed
            pieces[last_known] += text[len(emitted):]
    return pieces, flags


def _json_for_script(data: Any) -> str:
    # Inside <script>, "</" would end the element and "<!--" could open a comment: escape "<".
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace("\u2028", "\\u2028").replace(
        "\u2029", "\\u2029")


def trace_page(
    pieces: Sequence[str],
    steps: Sequence[int],
    is_special: Sequence[bool] | None = None,
    *,
    title: str = "Block-diffusion decode trace",
    prompt: str = "",
    meta: dict[str, Any] | None = None,
) -> str:
    """The HTML page (a string) replaying the unmasking order of one response.

    Args:
      pieces: display text of each generated token.
      steps: the trace: 1-based denoising step at which each token was unmasked.
      is_special: which tokens the "hide special tokens" toggle hides.
      prompt: shown above the response (already decoded text).
      meta: small key/value facts shown under the title (block size, strategy, ...).
    """
    if len(pieces) != len(steps):
        raise ValueError(f"pieces ({len(pieces)}) and steps ({len(steps)}) must have the same length")
    flags = [False] * len(pieces) if is_special is None else [bool(x) for x in is_special]
    if len(flags) != len(pieces):
        raise ValueError(f"is_special ({len(flags)}) and pieces ({len(pieces)}) must have the same length")
    step_list = [int(s) for s in steps]
    if any(s < 1 for s in step_list):
        raise ValueError(f"steps must be >= 1 (1-based denoising steps), got {min(step_list)}")
    data = {
        "pieces": [str(p) for p in pieces],
        "steps": step_list,
        "is_special": flags,
        "prompt": prompt,
        "meta": {str(k): str(v) for k, v in (meta or {}).items()},
    }
    values = {"TITLE": html.escape(title), "DATA": _json_for_script(data), "SCRIPT": REPLAY_SCRIPT}
    # one pass, so that text inside the values is never taken for a placeholder
    return re.sub(r"__(TITLE|DATA|SCRIPT)__", lambda match: values[match.group(1)], _PAGE)


def write_trace_page(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """Writes `trace_page(*args, **kwargs)` to `path` (UTF-8) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(trace_page(*args, **kwargs), encoding="utf-8")
    return path


# The replay logic is a pure function (`tokenStates`) so that it can be checked outside a browser;
# the DOM code runs only where a document exists.
REPLAY_SCRIPT = r"""
"use strict";
function tokenStates(steps, isSpecial, t, hideSpecial) {
  // One state per token at step t: "hidden" (special, toggle on), "masked", "new" (revealed at t), "shown".
  return steps.map(function (s, i) {
    if (hideSpecial && isSpecial[i]) return "hidden";
    if (s > t) return "masked";
    return s === t ? "new" : "shown";
  });
}
function maxStep(steps) {
  return steps.reduce(function (a, b) { return Math.max(a, b); }, 0);
}
function init() {
  var data = JSON.parse(document.getElementById("trace-data").textContent);
  var last = maxStep(data.steps);
  var slider = document.getElementById("step");
  var label = document.getElementById("step-label");
  var play = document.getElementById("play");
  var speed = document.getElementById("speed");
  var hide = document.getElementById("hide-special");
  var out = document.getElementById("tokens");
  var timer = null;
  document.getElementById("prompt").textContent = data.prompt;
  var metaText = Object.keys(data.meta).map(function (k) { return k + ": " + data.meta[k]; }).join(" \u00b7 ");
  document.getElementById("meta").textContent = metaText + (metaText ? " \u00b7 " : "") +
    data.pieces.length + " tokens, " + last + " steps";
  slider.max = String(last);
  var spans = data.pieces.map(function (piece) {
    var span = document.createElement("span");
    span.className = "tok";
    out.appendChild(span);
    return span;
  });
  function render() {
    var t = Number(slider.value);
    label.textContent = "step " + t + " / " + last;
    var states = tokenStates(data.steps, data.is_special, t, hide.checked);
    states.forEach(function (state, i) {
      var span = spans[i];
      span.className = "tok " + state;
      span.textContent = state === "masked" ? "|<MASK>|" : (state === "hidden" ? "" : data.pieces[i]);
      span.title = "token " + i + ", step " + data.steps[i];
    });
  }
  function stop() { if (timer !== null) { clearInterval(timer); timer = null; } play.textContent = "\u25b6 play"; }
  function start() {
    if (Number(slider.value) >= last) slider.value = "0";
    play.textContent = "\u275a\u275a pause";
    timer = setInterval(function () {
      if (Number(slider.value) >= last) { stop(); return; }
      slider.value = String(Number(slider.value) + 1);
      render();
    }, Number(speed.value));
  }
  play.addEventListener("click", function () { if (timer === null) start(); else stop(); });
  speed.addEventListener("change", function () { if (timer !== null) { stop(); start(); } });
  slider.addEventListener("input", function () { stop(); render(); });
  hide.addEventListener("change", render);
  document.addEventListener("keydown", function (e) {
    if (e.key === " ") { e.preventDefault(); play.click(); }
    if (e.key === "ArrowRight") { stop(); slider.value = String(Math.min(last, Number(slider.value) + 1)); render(); }
    if (e.key === "ArrowLeft") { stop(); slider.value = String(Math.max(0, Number(slider.value) - 1)); render(); }
  });
  render();
}
if (typeof document !== "undefined") {
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; margin-bottom: 0.2rem; }
  #meta { color: #666; font-size: 0.85rem; margin-bottom: 1rem; }
  #controls { display: flex; gap: 0.8rem; align-items: center; flex-wrap: wrap; position: sticky; top: 0;
              background: #fff; padding: 0.5rem 0; border-bottom: 1px solid #ddd; }
  #step { flex: 1; min-width: 12rem; }
  #step-label { font-variant-numeric: tabular-nums; min-width: 7rem; }
  details { margin: 1rem 0; }
  pre, #tokens { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace;
                 font-size: 0.9rem; line-height: 1.6; }
  #prompt { background: #f6f6f6; padding: 0.6rem; border-radius: 4px; }
  .tok.masked { color: #aaa; background: #eee; border-radius: 3px; }
  .tok.new { background: #ffd54f; border-radius: 3px; }
  .tok.shown { background: transparent; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div id="meta"></div>
<details><summary>prompt</summary><pre id="prompt"></pre></details>
<div id="controls">
  <button id="play" type="button">\u25b6 play</button>
  <input id="step" type="range" min="0" max="0" value="0" aria-label="denoising step">
  <span id="step-label">step 0</span>
  <label>speed <select id="speed">
    <option value="800">0.25x</option><option value="400">0.5x</option>
    <option value="200" selected>1x</option><option value="100">2x</option>
    <option value="50">4x</option><option value="20">10x</option>
  </select></label>
  <label><input id="hide-special" type="checkbox"> hide special tokens</label>
</div>
<div id="tokens"></div>
<script type="application/json" id="trace-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""
