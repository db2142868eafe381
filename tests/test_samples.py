"""samples: the record of a response against the text it was built from (tool output marked by its offsets), the
responses a step keeps (each kept group's best, worst and one other, within the budget) against a brute-force
count, the records a short training run writes against its own metrics.jsonl, and the drop on resume."""
import json
import random
import subprocess
import sys

import pytest

from conftest import REPO
from nanotorl.data import Problem, arithmetic_problems
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Completion, ToolCall
from nanotorl.rollout import score_completion
from nanotorl.samples import SampleLog, drop_after, logged_indices, read_records, sample_record
from nanotorl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


def completion(tok, parts, calls, finish="eos") -> Completion:
    """A completion of (text, mask) parts, mask 0 for tool output."""
    ids = [tok.encode(text) for text, _ in parts]
    mask = [m for (_, m), i in zip(parts, ids) for _ in i]
    return Completion([1], [i for part in ids for i in part], mask, [0.0] * len(mask), calls, finish)


def test_record_marks_the_tool_output_by_its_offsets(tok):
    parts = [("Let me add.\n```python\nprint(2 + 3)\n```\n", 1), ("```output\n5\n```\n", 0),
             ("Again:\n```python\nprint(x)\n```\n", 1), ("```output\nNameError: name 'x' is not defined\n```\n", 0),
             ("So \\boxed{5}", 1)]
    calls = [ToolCall("print(2 + 3)\n", "ok", "5", 0.01),
             ToolCall("print(x)\n", "error", "NameError: name 'x' is not defined", 0.01, "NameError")]
    problem = Problem("p1", "What is 2 + 3?", "5", source="arith")
    r = sample_record(score_completion(problem, completion(tok, parts, calls), tok.decode), tok, step=3)
    assert r["response"] == "".join(text for text, _ in parts)
    assert [r["response"][a:b] for a, b in r["masked"]] == [text for text, m in parts if m == 0]
    assert (r["id"], r["source"], r["answer"], r["extracted"], r["correct"], r["reward"]) == ("p1", "arith", "5", "5",
                                                                                             True, 1.0)
    assert r["prompt"] == tok.prompt("What is 2 + 3?") and r["step"] == 3
    assert [c["error_kind"] for c in r["tool_calls"]] == [None, "NameError"]
    assert r["policy_tokens"] == sum(len(tok.encode(t)) for t, m in parts if m)
    assert r["response_tokens"] == sum(len(tok.encode(t)) for t, _ in parts)
    assert (r["truncated"], r["void_turn"], r["finish_reason"]) == (False, False, "eos")
    assert json.loads(json.dumps(r)) == r


def test_record_of_a_response_cut_without_an_answer(tok):
    c = completion(tok, [("I think ```python\nprint(", 1)], [], finish="length")
    r = sample_record(score_completion(Problem("p", "Q?", "1"), c, tok.decode), tok)
    assert r["masked"] == [] and r["truncated"] and r["void_turn"] and r["extracted"] is None


def brute_force_ok(rewards, G, budget, picked) -> None:
    """``picked`` holds, within the budget, whole groups' best (first max), worst (first min) and others, 3 a group
    (all of a smaller group); only the last group touched may be cut short by the budget."""
    assert len(picked) == min(budget, min(G, 3) * (len(rewards) // G))
    by_group = {}
    for i in picked:
        by_group.setdefault(i // G, []).append(i)
    for g, members in by_group.items():
        group = rewards[g * G:(g + 1) * G]
        best, worst = g * G + group.index(max(group)), g * G + group.index(min(group))
        if len(members) == min(G, 3):
            assert best in members and worst in members
    assert sum(len(m) < min(G, 3) for m in by_group.values()) <= 1


@pytest.mark.parametrize("G,budget,values", [(4, 6, (-1, 1, 0.5)), (4, 7, (-1, 1)), (8, 100, (-1, 1, 0.5)),
                                             (2, 5, (-1, 1)), (1, 3, (-1, 1)), (4, 100, (1,))])
def test_each_kept_group_gives_its_best_worst_and_one_other(G, budget, values):
    rng = random.Random(G * 100 + budget)
    rewards = [float(rng.choice(values)) for _ in range(G * 6)]  # (1,): every group uniform, best is worst
    picked = logged_indices(rewards, G, budget, random.Random(0))
    assert picked == sorted(set(picked))
    brute_force_ok(rewards, G, budget, picked)
    assert picked == logged_indices(rewards, G, budget, random.Random(0))  # seeded


def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path):
    log = SampleLog(tmp_path, 0, 0)
    log.write([{"step": s, "x": s} for s in (1, 2, 2, 3)])
    SampleLog(tmp_path, 0, 2)
    assert [r["step"] for r in read_records(tmp_path / "samples.jsonl")] == [1, 2, 2]
    drop_after(tmp_path / "absent.jsonl", 1)  # nothing to drop
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_short_run_keeps_training_and_held_out_responses(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--out-dir", str(out), "--steps", "3", "--prompts-per-step", "4",
           "--group-size", "3", "--max-new-tokens", "48", "--eval-every", "2", "--eval-problems", "8", "--eval-k", "1",
           "--log-samples-every", "1", "--log-samples", "12", "--log-eval-samples", "6", "--save-every", "3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"python -m nanotorl.view {out}" in r.stdout + r.stderr
    records = list(read_records(out / "samples.jsonl"))
    train = [x for x in records if x["mode"] == "train"]
    greedy = [x for x in records if x["mode"] == "greedy"]
    assert [sum(x["step"] == s for x in train) for s in (1, 2, 3)] == [12, 12, 12]  # every response
    assert sorted({x["step"] for x in greedy}) == [0, 2, 3]
    metrics = {m["step"]: m for m in read_records(out / "metrics.jsonl")}
    for s in (1, 2, 3):
        step = [x for x in train if x["step"] == s]
        assert all(x["trained"] and x["index"] in range(3) for x in step)
        assert max(x["logprob_gap"] for x in step) == metrics[s]["logprob_gap_max"]  # the step's, all kept
        assert all(abs(x["advantage"]) < 2 for x in step) and min(x["reward"] for x in step) >= -1
    first = [p.id for p in arithmetic_problems(8, 0, "heldout")[:6]]
    for s in (0, 2, 3):  # the first 6 of the 8 held-out problems, each once
        assert sorted(x["id"] for x in greedy if x["step"] == s) == sorted(first)
        assert metrics[s]["eval_accuracy"] * 8 >= sum(x["correct"] for x in greedy if x["step"] == s)
