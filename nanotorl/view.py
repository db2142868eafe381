"""One self-contained HTML page to read a run's responses: what the policy wrote, ran, saw and earned.

    python -m nanotorl.view runs/demo                  # training: samples.jsonl + metrics.jsonl -> runs/demo/view.html
    python -m nanotorl.view runs/eval/step_000060      # eval.py's out dir (its samples.jsonl)
    python -m nanotorl.view some/samples.jsonl -o page.html

The page needs no server and no network (inline CSS and JS, a Content-Security-Policy that allows only its own
script, by hash, and no request): it opens from file:// and as a CI artifact. It shows the run's curves
(:data:`nanotorl.plot.PANELS`, hover for values), a step slider, the responses of one step and mode at a time,
paginated, with filters and search, and a side-by-side comparison of one held-out problem at two steps.

Model text is hostile. The data goes into the page as JSON inside ``<script type="application/json">`` elements
with every ``<``, ``>`` and ``&`` written as a JSON escape (so no text can close the element), and the page builds
its DOM with ``textContent`` only. Each step's responses are one such element, parsed the first time the step is
shown, so a page of 1,000 steps opens as fast as a page of one.

What the page gets of a record (:mod:`nanotorl.samples`) is cut here into parts: the policy's text, each fenced
block in it (:func:`nanotorl.fences.blocks`, the rule the generator calls the tool by) and each tool output, the
tokens the loss never saw.
"""
import base64
import hashlib
import html
import json
import math
import re
import sys
from importlib.resources import files
from pathlib import Path

from nanotorl import cli
from nanotorl.fences import blocks
from nanotorl.plot import panel_curves
from nanotorl.samples import read_records

ASSETS = files("nanotorl") / "view_assets"


def split_policy(text: str) -> list[list]:
    """A stretch of policy text as parts ["text", text] and ["code", opening line, content, closing line ("" while
    open), language], each fenced block's pieces as written."""
    parts, at = [], 0
    for block in blocks(text):
        end = len(text) if block.end is None else block.end
        closing = end if block.end is None else text.rfind("\n", block.body, end - 1) + 1 or block.body
        parts += [["text", text[at:block.start]]] if block.start > at else []
        parts.append(["code", text[block.start:block.body], text[block.body:closing], text[closing:end],
                      block.opening.lang])
        at = end
    return parts + ([["text", text[at:]]] if at < len(text) else [])


def response_parts(record: dict) -> list[list]:
    """The response of ``record`` as parts: :func:`split_policy` of each policy stretch, and ["output", the tool
    output as the model read it, its call's error kind or None, whether the sandbox itself failed]."""
    text, calls, parts, at = record["response"], record.get("tool_calls", []), [], 0
    for n, (start, end) in enumerate(record.get("masked", [])):
        parts += split_policy(text[at:start])
        call = calls[n] if n < len(calls) else {}
        parts.append(["output", text[start:end], call.get("error_kind"), bool(call.get("infra_error"))])
        at = end
    return parts + split_policy(text[at:])


def page_record(record: dict) -> dict:
    """What the page shows of one record, under short keys (a page may hold 64,000 of them)."""
    return {"id": str(record.get("id")), "src": record.get("source") or record.get("dataset") or "",
            "i": record.get("index", 0), "prompt": record.get("prompt") or record.get("problem", ""),
            "gold": str(record.get("answer")), "ans": record.get("extracted"), "ok": bool(record.get("correct")),
            "r": record.get("reward"), "adv": record.get("advantage"), "fin": record.get("finish_reason"),
            "trunc": bool(record.get("truncated")), "void": bool(record.get("void_turn")),
            "trained": record.get("trained", True), "tok": record.get("response_tokens"),
            "gap": record.get("logprob_gap"),
            "errs": sorted({c["error_kind"] for c in record.get("tool_calls", []) if c.get("error_kind")}),
            "parts": response_parts(record)}


def chunks(records) -> dict[tuple[str, int], list[dict]]:
    """{(mode, step): page records}, in the order steps and modes first appear; eval.py's records are step 0."""
    out = {}
    for r in records:
        out.setdefault((r.get("mode", "train"), r.get("step", 0)), []).append(page_record(r))
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0] != "train", kv[0][0], kv[0][1])))


def embed(obj) -> str:
    """``obj`` as JSON that is safe inside a <script> element: no <, > or & (nor a line separator) left as is."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def render(records, metrics: list[dict], title: str) -> str:
    """The page (module docstring) of ``records`` and the run's ``metrics`` (metrics.jsonl's records, or [])."""
    parts = chunks(records)
    curves = {title: {key: [p for p in points if math.isfinite(p[1])] for key, points in panel.items()}
              for title, panel in panel_curves(metrics).items()}  # a NaN (a diverged run) is no point, and no JSON
    meta = {"title": title, "curves": curves,
            "chunks": [{"mode": mode, "step": step, "n": len(rs)} for (mode, step), rs in parts.items()],
            "sources": sorted({r["src"] for rs in parts.values() for r in rs}),
            "errors": sorted({e for rs in parts.values() for r in rs for e in r["errs"]})}
    script = (ASSETS / "page.js").read_text()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    data = "\n".join(f'<script type="application/json" id="chunk{i}">{embed(rs)}</script>'
                     for i, rs in enumerate(parts.values()))
    values = {"TITLE": html.escape(title), "SCRIPT_HASH": f"sha256-{digest}", "META": embed(meta), "CHUNKS": data,
              "STYLE": (ASSETS / "page.css").read_text(), "SCRIPT": script}
    # one pass over the template: a value's own text (a response that writes "{{SCRIPT}}") is never replaced
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m[1]], (ASSETS / "page.html").read_text())


def load(path: Path) -> tuple[list[dict], list[dict], Path]:
    """(records, metrics, default page path) of a run or eval directory, or of one samples file."""
    samples = path / "samples.jsonl" if path.is_dir() else path
    if not samples.is_file():
        raise FileNotFoundError(f"{path}: expected a run or eval.py directory holding samples.jsonl, or a samples "
                                f"file; found neither: pass the out dir of train.py or eval.py")
    metrics_file = samples.parent / "metrics.jsonl"
    metrics = list(read_records(metrics_file)) if metrics_file.is_file() else []
    return list(read_records(samples)), metrics, samples.parent / f"{'view' if path.is_dir() else samples.stem}.html"


def main(argv=None) -> Path:
    p = cli.ArgumentParser(prog="python -m nanotorl.view", description="Write one self-contained HTML page of "
                           "a run's responses (see the module docstring)")
    p.add_argument("path", type=Path, help="a train.py or eval.py out dir, or a samples .jsonl file")
    p.add_argument("-o", "--out", type=Path, help="the page (default: view.html in the dir, or beside the file)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (else one line)")
    args = p.parse_args(argv)
    records, metrics, default = load(args.path)
    out = args.out or default
    out.write_text(render(records, metrics, str(args.path)))
    print(f"{len(records)} responses of {args.path} in {out}; open file://{out.resolve()} in a browser")
    return out


if __name__ == "__main__":
    sys.exit(cli.run(main))
