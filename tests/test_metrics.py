"""pass@k against brute-force enumeration of all k-subsets; maj@k on hand-made votes; the mean over sources and the
Markdown table by hand."""

import itertools
from fractions import Fraction

import pytest

from nanotorl.metrics import maj_at_k, mean_pass_at_k, pass_at_k, print_table, source_mean


def brute_force_pass_at_k(correct: list[bool], k: int) -> Fraction:
    """Fraction of all k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(samples, k)), abs=1e-12)


def test_pass_at_k_is_not_first_k_any():
    # 1 correct sample of 4: "any of the first 2" depends on order, the estimator is 1 - C(3,2)/C(4,2) = 1/2
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)


def test_pass_at_k_large_n_is_finite_and_exact():
    # C(1000, 500) overflows floats; the product form must not: 1 - C(990, 500)/C(1000, 500)
    from math import comb

    exact = 1 - Fraction(comb(990, 500), comb(1000, 500))
    assert pass_at_k(1000, 10, 500) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 1, 0), (4, 1, 5), (4, 5, 2), (4, -1, 2)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems_with_brute_force():
    correct = [[True, False, False, True], [False] * 4, [True] * 4, [False, False, True, False]]
    for k in range(1, 5):
        expected = sum(brute_force_pass_at_k(row, k) for row in correct) / len(correct)
        assert mean_pass_at_k(correct, k) == pytest.approx(float(expected))
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


def exact(a: str, b: str) -> bool:
    return a == b


def test_maj_at_k_majority_wins_and_none_does_not_vote():
    answers = ["5", None, "7", "5", None, None, "7", "7"]
    assert maj_at_k(answers, "5", 4, equivalent=exact)  # first 4: 5 twice, 7 once
    assert not maj_at_k(answers, "5", 8, equivalent=exact)  # all 8: 7 three times
    assert not maj_at_k([None, None], "5", 2, equivalent=exact)


def test_maj_at_k_tie_goes_to_earliest_group():
    assert maj_at_k(["3", "4", "4", "3"], "3", 4, equivalent=exact)
    assert not maj_at_k(["4", "3", "3", "4"], "3", 4, equivalent=exact)


def test_maj_at_k_groups_equivalent_answers_with_the_reward_check():
    # "0.5" and "\frac12" form one group of 2 and beat the single "1"
    assert maj_at_k(["1", "0.5", "\\frac12"], "\\frac{1}{2}", 3)
    assert not maj_at_k(["1", "0.5", "\\frac12"], "\\frac{1}{2}", 3, equivalent=exact)


def test_source_mean_is_unweighted_and_skips_undefined_values():
    rows = [{"acc": 0.5, "ok": None, "tools": {"calls": 1.0, "ok": None}},   # e.g. 30 problems
            {"acc": 1.0, "ok": 0.25, "tools": {"calls": 3.0, "ok": None}},   # e.g. 500 problems: same weight
            {"acc": 0.0, "ok": 0.75, "tools": {"calls": 2.0, "ok": None}}]
    assert source_mean(rows) == {"acc": 0.5, "ok": 0.5, "tools": {"calls": 2.0, "ok": None}}
    with pytest.raises(ValueError, match="at least one source"):
        source_mean([])


def test_markdown_table_has_header_rule_and_the_same_cells(capsys):
    rows = [{"source": "aime24", "n": "30", "greedy": "3.3"}, {"source": "average", "n": "194", "greedy": "-"}]
    print_table(rows, ["source", "n", "greedy"], markdown=True)
    assert capsys.readouterr().out.splitlines() == ["| source  | n   | greedy |",
                                                    "| ---     | --- | ---    |",
                                                    "| aime24  | 30  | 3.3    |",
                                                    "| average | 194 | -      |"]
