"""The rollout page at scale: 1,000 logged steps x 64 responses (synthetic, demo-like records), against a page of one
step of the same responses, in headless Chromium.

    python -m bench.view                    # needs Chromium and Playwright: apt-get install -y chromium &&
                                            # pip install -e '.[browser]'
    python -m bench.view --steps 100 --per-step 64

For each page: its size, the time ``nanotorl.view.render`` takes to write it, the time to first render in the
browser (navigation start to the load event: the page's script renders the newest step before it), and, each the
median of 5 tries, the time to apply a filter (outcome: correct), to search the step's text, and to move the slider
to another step (parsing that step's JSON), each until two animation frames later (layout and paint included).
"""
import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import save_result
from nanotorl.metrics import print_table
from nanotorl.view import render

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PROMPT = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\nUser: "
          "Please integrate natural language reasoning with programs to solve the problem above, and put your final "
          "answer within \\boxed{{}}.\nWhat is {a} * {b}?\nAssistant:")
TIMED = {  # what one try does in the page, then waits two frames
    "filter": "s => { const e = document.getElementById('outcome'); e.value = s ? 'correct' : 'wrong'; "
              "e.dispatchEvent(new Event('change')); }",
    "search": "s => { const e = document.getElementById('search'); e.value = s ? 'print(' : 'boxed{1'; "
              "e.dispatchEvent(new Event('input')); }",
    "step": "s => { const e = document.getElementById('step'); e.value = String(Math.floor(Math.random() * "
            "(+e.max + 1))); e.dispatchEvent(new Event('input')); }",
}


def record(step: int, i: int, rng: random.Random) -> dict:
    """One demo-like training record: a sentence, a python block, its output, the answer."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    correct = rng.random() < min(0.9, 0.1 + step / 1000)
    answer = a * b if correct else a * b + rng.randint(1, 99)
    policy = f"We multiply {a} by {b} with the tool.\n```python\nx = {a}\ny = {b}\nprint(x * y)\n```\n"
    output = f"```output\n{a * b}\n```\n"
    return {"id": f"p{step}-{i // 8}", "source": rng.choice(["arith:3d*3d", "arith:2d+2d"]),
            "problem": f"What is {a} * {b}?", "prompt": PROMPT.format(a=a, b=b), "answer": str(a * b),
            "extracted": str(answer), "correct": correct, "reward": 1.0 if correct else -1.0,
            "response": policy + output + f"The answer is \\boxed{{{answer}}}<|endoftext|>",
            "masked": [[len(policy), len(policy) + len(output)]],
            "tool_calls": [{"code": f"x = {a}\ny = {b}\nprint(x * y)\n", "status": "ok", "observation": str(a * b),
                            "error_kind": None, "infra_error": False}],
            "finish_reason": "eos", "truncated": False, "void_turn": False, "response_tokens": 60,
            "policy_tokens": 50, "step": step, "mode": "train", "index": i % 8, "advantage": rng.gauss(0, 1),
            "trained": True}


def synthetic_run(steps: int, per_step: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    records = [record(s, i, rng) for s in range(1, steps + 1) for i in range(per_step)]
    metrics = [{"step": s, "reward": -1 + 2 * min(0.9, 0.1 + s / 1000), "tool_fraction": 0.5, "response_length": 60,
                "eval_accuracy": min(0.9, s / 1000) if s % 10 == 0 else None} for s in range(1, steps + 1)]
    return records, metrics


def in_browser(page_file: Path) -> dict:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
        tab = browser.new_page()
        t0 = time.perf_counter()
        tab.goto(page_file.resolve().as_uri(), wait_until="load", timeout=300_000)
        wall = time.perf_counter() - t0
        nav = tab.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd") / 1e3
        out = {"shown": tab.locator("#list .response").count(), "load_wall_s": wall, "first_render_s": nav}
        for name, action in TIMED.items():
            tries = [tab.evaluate(f"""async () => {{ const t = performance.now(); ({action})({k % 2});
                await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
                return performance.now() - t; }}""") for k in range(5)]
            out[f"{name}_ms"] = statistics.median(tries)
        browser.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--per-step", type=int, default=64)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (1, args.steps):
            records, metrics = synthetic_run(steps, args.per_step)
            t0 = time.perf_counter()
            html = render(records, metrics, f"synthetic {steps} x {args.per_step}")
            write_s = time.perf_counter() - t0
            page = Path(tmp) / f"page{steps}.html"
            page.write_text(html)
            rows.append({"steps": steps, "responses": len(records), "page_MB": page.stat().st_size / 1e6,
                         "write_s": write_s} | in_browser(page))
    print_table(rows, list(rows[0]))
    save_result("view", rows)


if __name__ == "__main__":
    main()
