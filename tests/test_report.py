"""nanotorl.report: metrics of hand-built records, the rows of several datasets with and without sources, the k
shown in the table. (eval.py's tables on files with several sources, end to end: tests/test_eval.py.)"""
import pytest

from nanotorl.data import Problem
from nanotorl.report import report, source_rows, summarize, table_ks


def record(pid, mode, index, extracted, correct, tokens=10, calls=(), dataset="d"):
    return {"dataset": dataset, "id": pid, "mode": mode, "index": index, "extracted": extracted, "correct": correct,
            "response_tokens": tokens, "tool_calls": [{"status": s} for s in calls]}


def keyed(rows):
    return {(r["dataset"], r["id"], r["mode"], r["index"]): r for r in rows}


def test_summarize_hand_built_samples():
    problems = [Problem("a", "A?", "5"), Problem("b", "B?", "12")]
    rows = [record("a", "greedy", 0, "5", True), record("b", "greedy", 0, None, False),
            # a: c=2 of 4; votes 5 | 5,3 | 5,3,3 | 5,3,3,5.0 -> right, right (tie: earliest), wrong, right (tie)
            record("a", "sampled", 0, "5", True, 10, ["ok"]),
            record("a", "sampled", 1, "3", False, 20, ["ok", "error"]),
            record("a", "sampled", 2, "3", False, 30), record("a", "sampled", 3, "5.0", True, 40),
            # b: c=1 of 4; 13 comes first and is never outvoted -> maj wrong for every k
            record("b", "sampled", 0, "13", False, 50), record("b", "sampled", 1, "12", True, 60),
            record("b", "sampled", 2, None, False, 70, ["timeout"]), record("b", "sampled", 3, "7", False, 80)]
    res = summarize(keyed(rows), [("d", p) for p in problems], 4)
    # pass@k = 1 - C(4-c, k)/C(4, k): a (c=2): 1/2, 5/6, 1, 1; b (c=1): 1/4, 1/2, 3/4, 1
    expected = {"problems": 2, "greedy": 0.5, "avg@4": 3 / 8,
                "pass@1": 3 / 8, "pass@2": (5 / 6 + 1 / 2) / 2, "pass@3": (1 + 3 / 4) / 2, "pass@4": 1.0,
                "maj@1": 0.5, "maj@2": 0.5, "maj@3": 0.0, "maj@4": 0.5,
                "tool_fraction": 3 / 8, "calls_ok_fraction": 2 / 4, "calls_per_response": 4 / 8,
                "response_length": 45.0}
    assert res.pop("greedy_tools") == {"tool_fraction": 0.0, "calls_ok_fraction": None, "calls_per_response": 0.0,
                                       "response_length": 10.0}
    assert res == pytest.approx(expected)


def test_rows_per_source_qualified_when_two_files_share_one():
    x = [Problem("x0", "1?", "1", "alpha"), Problem("x1", "2?", "2", "beta"), Problem("x2", "3?", "3", "alpha")]
    y = [Problem("y0", "4?", "4", "beta"), Problem("y1", "5?", "5", "y")]   # "y": a row without a source
    z = [Problem("z0", "6?", "6", "z")]
    rows = source_rows({"x": x, "y": y, "z": z})
    assert {name: [(d, p.id) for d, p in members] for name, members in rows.items()} == {
        "alpha": [("x", "x0"), ("x", "x2")], "x/beta": [("x", "x1")], "y/beta": [("y", "y0")], "y": [("y", "y1")],
        "z": [("z", "z0")]}


def test_report_average_all_and_time_of_whole_files():
    """Two files: x with sources s (2 problems, both greedy right) and t (1 problem, wrong), z without source (1
    problem, right); k = 1."""
    sets = {"x": [Problem("p", "P?", "1", "s"), Problem("q", "Q?", "1", "s"), Problem("r", "R?", "1", "t")],
            "z": [Problem("u", "U?", "1", "z")]}
    right = {"p": True, "q": True, "r": False, "u": True}
    rows = [record(pid, mode, 0, "1" if ok else "2", ok, dataset=d) for d, ps in sets.items() for pid, ok in
            ((p.id, right[p.id]) for p in ps) for mode in ("greedy", "sampled")]
    rep = report(keyed(rows), sets, 1, {"x": 3.0, "z": 1.5})
    assert {name: (r["dataset"], r["problems"], r["greedy"], r["time_s"]) for name, r in rep["results"].items()} == {
        "s": ("x", 2, 1.0, None), "t": ("x", 1, 0.0, None), "z": ("z", 1, 1.0, 1.5)}
    assert (rep["average"]["sources"], rep["average"]["problems"]) == (3, 4)
    assert rep["average"]["greedy"] == pytest.approx(2 / 3) and rep["average"]["maj@1"] == pytest.approx(2 / 3)
    assert rep["all"]["greedy"] == pytest.approx(3 / 4) and rep["all"]["time_s"] == 4.5


def test_table_shows_powers_of_two_and_k():
    assert table_ks(16) == [2, 4, 8, 16]
    assert table_ks(12) == [2, 4, 8, 12]
    assert table_ks(1) == []
