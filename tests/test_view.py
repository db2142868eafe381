"""view: the page's parts against the text they come from, JSON that no text can close its <script> with, and the
page of a short training run, with hostile responses added, in headless Chromium: what the step slider, the
filters, search and the comparison show is counted against the records of samples.jsonl; no script of the model
runs, and no request leaves file://."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from nanotorl.samples import read_records
from nanotorl.view import embed, main, render, response_parts, split_policy

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium && pip install -e '.[browser]'"
needs_browser = pytest.mark.skipif(sync_playwright is None or not Path(CHROMIUM).exists(),
                                   reason=f"needs Chromium and Playwright: {INSTALL}")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
HOSTILE = ["</script><script>window.__pwned = 1</script>", "<img src=http://example.invalid/x.png "
           "onerror=\"window.__pwned = 2\">", "<!--", "{{SCRIPT}}", "\u2028"]


def test_policy_text_splits_at_fenced_blocks_as_written():
    text = "Try:\n```python\nx = 1\nprint(x)\n```\nand ```python inline\n  ```py\nopen\n"
    parts = split_policy(text)
    assert "".join("".join(p[1:4]) if p[0] == "code" else p[1] for p in parts) == text
    assert parts == [["text", "Try:\n"], ["code", "```python\n", "x = 1\nprint(x)\n", "```\n", "python"],
                     ["text", "and ```python inline\n"], ["code", "  ```py\n", "open\n", "", "py"]]
    assert split_policy("```python\n```\n") == [["code", "```python\n", "", "```\n", "python"]]


def test_tool_output_is_its_own_part_with_its_call():
    record = {"response": "```python\nprint(x)\n```\n```output\nNameError\n```\nSo \\boxed{1}", "masked": [[23, 47]],
              "tool_calls": [{"error_kind": "NameError", "infra_error": False}]}
    assert response_parts(record) == [["code", "```python\n", "print(x)\n", "```\n", "python"],
                                      ["output", "```output\nNameError\n```\n", "NameError", False],
                                      ["text", "So \\boxed{1}"]]


def test_embedded_json_cannot_close_its_element():
    obj = {"t": "".join(HOSTILE) + "&amp; > <"}
    text = embed(obj)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == obj


def test_a_samples_file_of_eval_gets_its_page_beside_it(tmp_path, capsys):
    old = {"dataset": "aime24", "id": "1", "problem": "Q?", "answer": "2", "response": "So \\boxed{2}",
           "extracted": "2", "correct": True, "reward": 1.0, "tool_calls": [], "finish_reason": "eos",
           "response_tokens": 5}  # a record eval.py wrote before the shared one: no masked offsets, no prompt
    file = tmp_path / "samples.jsonl"
    file.write_text("".join(json.dumps(old | {"mode": m, "index": i}) + "\n" for m, i in
                            (("greedy", 0), ("sampled", 0), ("sampled", 1))))
    assert main([str(file)]) == tmp_path / "samples.html"
    assert "3 responses" in capsys.readouterr().out
    meta = (tmp_path / "samples.html").read_text().split('<script type="application/json" id="meta">')[1]
    assert json.loads(meta.split("</script>")[0])["chunks"] == [{"mode": "greedy", "step": 0, "n": 1},
                                                               {"mode": "sampled", "step": 0, "n": 2}]
    with pytest.raises(FileNotFoundError, match="samples.jsonl"):
        main([str(tmp_path / "nothing")])


def hostile_records(step: int) -> list[dict]:
    """Training records whose every text field is hostile, one per attack in its text, code and tool output."""
    bad = "".join(HOSTILE)
    records = []
    for k, text in enumerate(HOSTILE):
        policy, output = f"{text}\n```python\n{text}\n```\n", f"```output\n{text}\n```\n"
        records.append({
            "id": f"evil{k}", "source": bad, "problem": bad, "prompt": bad, "answer": bad, "extracted": bad,
            "correct": False, "reward": -1.0, "response": policy + output + text,
            "masked": [[len(policy), len(policy + output)]],
            "tool_calls": [{"code": text, "status": "error", "observation": text, "error_kind": bad}],
            "finish_reason": bad, "truncated": True, "void_turn": True, "response_tokens": 9, "policy_tokens": 5,
            "step": step, "mode": "train", "index": 0, "advantage": 0.0, "trained": False})
    return records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step demo run (training responses kept every step, held-out ones at steps 0, 2 and 3) plus hostile
    records at step 2, and its page."""
    out = tmp_path_factory.mktemp("view") / "run"
    cmd = [sys.executable, "train.py", "--out-dir", str(out), "--steps", "3", "--prompts-per-step", "8",
           "--group-size", "4", "--max-new-tokens", "48", "--eval-every", "2", "--eval-problems", "30", "--eval-k", "1",
           "--log-samples-every", "1", "--log-samples", "12", "--log-eval-samples", "30", "--save-every", "3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "samples.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in hostile_records(2)))
    main([str(out)])
    return out


def test_the_page_holds_one_script_of_its_own_per_chunk(run):
    page = (run / "view.html").read_text()
    chunks = {(r["mode"], r["step"]) for r in read_records(run / "samples.jsonl")}
    assert page.count("<script") == page.count("</script>") == len(chunks) + 2  # + the meta data and the code
    assert render([], [], "<b>x</b>").count("<b>") == 0
    nan = render([], [{"step": 1, "reward": float("nan")}, {"step": 2, "reward": 0.5}], "t")
    assert '"training reward":{"reward":[[2,0.5]]}' in nan


@pytest.fixture(scope="module")
def page(run):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        context = browser.new_context()
        requests, errors = [], []
        context.on("request", lambda request: requests.append(request.url))
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                      else route.abort())
        tab = context.new_page()
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto((run / "view.html").resolve().as_uri())
        yield tab, requests, errors
        browser.close()


def shown(tab) -> list[str]:
    """The heading line ("source · id #i · step s") of each response on the list."""
    return tab.locator("#list .response .who").all_inner_texts()


def set_step(tab, index: int) -> None:
    tab.eval_on_selector("#step", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(index))


def at(run, mode: str, step: int) -> list[dict]:
    return [r for r in read_records(run / "samples.jsonl") if r["mode"] == mode and r["step"] == step]


@needs_browser
def test_slider_and_filters_show_the_records_of_the_file(run, page):
    tab, _, errors = page
    assert tab.input_value("#mode") == "train" and tab.inner_text("#step-label") == "3"
    for index, step in enumerate((1, 2, 3)):
        set_step(tab, index)
        expected = at(run, "train", step)
        assert tab.inner_text("#step-label") == str(step)
        assert sorted(w.split(" · ")[-2] for w in shown(tab)) == sorted(f"{r['id']} #{r['index']}" for r in expected)
        for outcome, want in (("correct", True), ("wrong", False)):
            tab.select_option("#outcome", outcome)
            assert len(shown(tab)) == sum(r["correct"] == want for r in expected)
        tab.select_option("#outcome", "")
    set_step(tab, 1)
    tab.select_option("#flag", "untrained")
    assert len(shown(tab)) == len(at(run, "train", 2)) - sum(r["trained"] for r in at(run, "train", 2)) == 5
    tab.select_option("#flag", "")
    tab.fill("#search", "__PWNED = 2")
    assert len(shown(tab)) == 5  # every hostile record holds each attack in its prompt
    tab.fill("#search", "")
    assert not errors


@needs_browser
def test_hostile_text_is_shown_as_text_and_runs_nothing(page):
    tab, requests, errors = page
    set_step(tab, 1)
    tab.select_option("#flag", "untrained")
    text = tab.inner_text("#list")
    assert text.count(HOSTILE[0]) >= 5 and text.count(HOSTILE[1]) >= 5  # in each heading, at least
    assert tab.locator("#list .part-code").count() == tab.locator("#list .part-output").count() == 5
    assert tab.evaluate("window.__pwned") is None
    assert tab.locator("img").count() == 0
    assert tab.evaluate("document.scripts.length") == tab.evaluate(
        "document.querySelectorAll('script[type=\"application/json\"]').length") + 1
    tab.select_option("#flag", "")
    assert requests and all(url.startswith("file://") for url in requests), requests
    assert not errors


@needs_browser
def test_comparison_shows_one_problem_at_two_steps(run, page):
    tab, _, errors = page
    tab.select_option("#mode", "greedy")
    assert tab.inner_text("#step-label") == "3" and len(shown(tab)) == 25  # 30 problems, 25 a page
    tab.click("#next")
    assert len(shown(tab)) == 5
    tab.locator("#list .compare").first.click()
    sides = tab.locator("#compare .response .who").all_inner_texts()
    problem = sides[0].split(" · ")[1]
    assert [s.split(" · ")[1:] for s in sides] == [[problem, "step 0"], [problem, "step 3"]]
    tab.locator("#compare .side-step").nth(1).select_option(label="step 2")
    sides = tab.locator("#compare .response .who").all_inner_texts()
    assert [s.split(" · ")[1:] for s in sides] == [[problem, "step 0"], [problem, "step 2"]]
    for side, step in zip(tab.locator("#compare .response").all(), (0, 2)):
        record = next(r for r in at(run, "greedy", step) if r["id"] == problem)
        assert ("correct" if record["correct"] else "wrong") in side.locator(".badge").first.inner_text()
    assert not errors
