"""Data: the ToRL prompt, JSONL and ToRL-parquet loading, clear errors for bad rows, synthetic arithmetic splits."""

import json
import re
from pathlib import Path

import pytest

from nanotorl.data import (TORL_TEMPLATE, ArithmeticKind, arithmetic_problems, bare_problem, drop_duplicates,
                           find_duplicates, load_problems, repeats_line, torl_prompt)
from nanotorl.reward import Verifier

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MISSION = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "mission.md"


def test_template_is_the_one_in_the_mission():
    if not MISSION.is_file():
        pytest.skip(f"mission.md not found at {MISSION} (the shared folder is not next to the repository)")
    quoted = re.search(r"`(A conversation between User and Assistant\..*?Assistant:)`", MISSION.read_text(), re.DOTALL)
    assert quoted is not None, "mission.md no longer quotes the prompt"
    assert quoted.group(1).replace("\\n", "\n") == TORL_TEMPLATE


def test_torl_prompt_fills_the_problem_and_keeps_boxed():
    prompt = torl_prompt("What is 2 + 2?")
    assert prompt.endswith("within \\boxed{}.\nWhat is 2 + 2?\nAssistant:")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert bare_problem(prompt) == "What is 2 + 2?"
    assert bare_problem("  What is 2 + 2?\n") == "What is 2 + 2?"


@pytest.mark.parametrize("name,rows", [("aime24", 30), ("aime25", 30), ("math500_subset", 134)])
def test_shared_eval_sets_load_and_every_answer_is_self_equivalent(name, rows):
    path = SHARED_DATA / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared data folder is not next to the repository)")
    problems = load_problems(path)
    assert len(problems) == rows and problems.skipped == []
    assert len({p.id for p in problems}) == rows
    assert find_duplicates(problems) == []
    verifier = Verifier()
    try:  # math-verify itself (no fast path) must parse each answer into something equal to itself
        assert [p.answer for p in problems if not verifier.check(p.answer, p.answer)] == []
    finally:
        verifier.close()


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_defaults_and_numbers(tmp_path):
    path = write_jsonl(tmp_path / "toy.jsonl", [
        json.dumps({"problem": "1+1?", "answer": 2}),
        "",
        json.dumps({"problem": "2+2?", "answer": "4", "id": "q2", "source": "hand"}),
    ])
    a, b = load_problems(path)
    assert (a.id, a.problem, a.answer, a.source) == ("toy-000", "1+1?", "2", "toy")
    assert (b.id, b.answer, b.source) == ("q2", "4", "hand")


@pytest.mark.parametrize("bad_line,reason", [
    ('{"problem": "3+3?", "answer": ', "not valid JSON"),
    ('{"problem": "3+3?"}', "missing field"),
    ('{"problem": "", "answer": "6"}', "non-empty string"),
    ('{"problem": "3+3?", "answer": [6]}', "string or a number"),
    ('["3+3?", "6"]', "JSON object"),
    ('{"problem": "3+3?", "answer": "6", "id": "q1"}', "already used"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, reason):
    good = [json.dumps({"problem": "1+1?", "answer": "2", "id": "q1"}), json.dumps({"problem": "2+2?", "answer": "4"})]
    path = write_jsonl(tmp_path / "bad.jsonl", good + [bad_line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + reason):
        load_problems(path)
    loaded = load_problems(path, skip_bad=True)
    assert [p.problem for p in loaded] == ["1+1?", "2+2?"]
    assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith(f"{path}:3: ")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_problems(tmp_path / "nope.jsonl")


def torl_row(content, truth, source="math"):
    return {"data_source": source, "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"ground_truth": truth, "style": "rule"}, "extra_info": {"index": 0, "split": "test"}}


def test_torl_parquet_loads_templated_and_bare_prompts(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [torl_row(torl_prompt("Find $x$ if $2x = 6$."), "3", "aime24"),
            torl_row("What is $\\frac{1}{2} + \\frac{1}{4}$?", "\\frac{3}{4}")]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    a, b = load_problems(path)
    assert (a.id, a.problem, a.answer, a.source) == ("test-000", "Find $x$ if $2x = 6$.", "3", "aime24")
    assert (b.problem, b.answer) == ("What is $\\frac{1}{2} + \\frac{1}{4}$?", "\\frac{3}{4}")
    assert torl_prompt(a.problem) == rows[0]["prompt"][0]["content"]


def test_bad_parquet_row_names_file_and_row(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [torl_row("1+1?", "2"), torl_row("2+2?", "4")]
    rows[1]["reward_model"] = {"ground_truth": None, "style": "rule"}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*ground_truth"):
        load_problems(path)
    assert len(load_problems(path, skip_bad=True)) == 1


def test_parquet_without_data_source_is_its_own_source(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [torl_row("1+1?", "2", "aime24"), torl_row("2+2?", "4", None), torl_row("3+3?", "6", "")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mine.parquet")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "data_source"} for r in rows]),
                   tmp_path / "bare.parquet")
    assert [p.source for p in load_problems(tmp_path / "mine.parquet")] == ["aime24", "mine", "mine"]
    assert [p.source for p in load_problems(tmp_path / "bare.parquet")] == ["bare"] * 3


def test_duplicates_found_up_to_whitespace_and_summed_up_in_one_line(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [json.dumps({"problem": p, "answer": "1"}) for p in
                                                 ["A  b?", "C?", "A b?", "D?", "C?", "A b? "]])
    problems = load_problems(path)
    assert find_duplicates(problems) == [[0, 2, 5], [1, 4]]
    assert [p.problem for p in drop_duplicates(problems)] == ["A  b?", "C?", "D?"]
    assert repeats_line("dup", problems) == ("dup: 3 of 6 rows repeat 2 problems; each problem is evaluated and "
                                             "counted once")
    assert repeats_line("once", drop_duplicates(problems)) is None


def test_arithmetic_is_deterministic_correct_and_splits_are_disjoint():
    train, heldout = arithmetic_problems(400, seed=1), arithmetic_problems(200, seed=2, split="heldout")
    assert train == arithmetic_problems(400, seed=1)
    assert train != arithmetic_problems(400, seed=3)
    assert not {p.problem for p in train} & {p.problem for p in heldout}
    assert not {p.problem for p in train} & {p.problem for p in arithmetic_problems(200, seed=1, split="heldout")}
    assert len({p.problem for p in train}) == 400
    for p in train + heldout:  # an independent check of every answer
        expr = re.fullmatch(r"What is (.*)\?", p.problem).group(1)
        assert int(p.answer) == eval(expr)
    kinds = {p.source for p in train}
    assert {"arithmetic:2d+2d", "arithmetic:3d*2d", "arithmetic:3d*3d"} <= kinds


def test_arithmetic_kinds_are_arguments_and_small_spaces_fail_clearly():
    only = arithmetic_problems(50, seed=0, kinds=(ArithmeticKind("*", (3, 2)),))
    assert all(p.source == "arithmetic:3d*2d" and 100 <= int(p.problem.split()[2]) <= 999 for p in only)
    with pytest.raises(ValueError, match="distinct"):
        arithmetic_problems(100, seed=0, kinds=(ArithmeticKind("+", (1, 1)),))  # only 64 such problems exist
    with pytest.raises(ValueError, match="split"):
        arithmetic_problems(5, seed=0, split="test")


def test_a_parquet_file_without_a_prompt_or_problem_column_lists_the_columns_it_has(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "1 + 1?", "reward_model": {"ground_truth": "2"}}]),
                   tmp_path / "q.parquet")
    with pytest.raises(ValueError) as error:
        load_problems(tmp_path / "q.parquet")
    assert str(error.value) == (f"{tmp_path / 'q.parquet'}: no 'prompt' column (ToRL parquet: prompt, reward_model"
                                f"[, data_source]) and no 'problem' column (problem, answer); found columns "
                                f"['question', 'reward_model']")
