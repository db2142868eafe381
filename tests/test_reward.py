"""Rewards: boxed extraction, answers found only in policy tokens, equivalence of tricky pairs, hard deadlines."""

import json
import signal
import threading

import numpy as np
import pytest

from nanotorl.reward import (Verifier, _fast_equivalent, _Worker, final_answer, is_equivalent, last_boxed, policy_segments,
                             score)


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(workers=1)
    yield v
    v.close()


# ------------------------------------------------------------------------------------------------- last_boxed


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} and later \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\left(\\frac{3}{5},\\frac{8}{3}\\right]}", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are text, not grouping
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$ done", "5"),
    ("\\boxed {12}", "12"),
    ("\\boxed{\\boxed{7}}", "7"),
    ("\\boxed{3} then \\boxed{4", None),  # the last one is unclosed (truncated response)
    ("no answer here", None),
    ("\\boxedanswer{3}", None),  # another command, not \boxed
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# ------------------------------------------------------------------------------------ policy tokens vs tool output


def fake_tokens(parts: list[tuple[str, int]]):
    """Character-level 'tokenizer': (text, mask) parts -> ids [T], mask [T]; decode inverts it."""
    ids = [ord(ch) for text, _ in parts for ch in text]
    mask = [m for text, m in parts for _ in text]
    return ids, mask


def decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


CODE = "Let me compute.\n```python\nx = 6 * 7\nprint(f'\\\\boxed{{{x}}}')\n```\n"  # only the output holds 42
TOOL = "```output\n\\boxed{42}\n```\n"


def test_answer_only_in_tool_output_scores_minus_one():
    ids, mask = fake_tokens([(CODE, 1), (TOOL, 0), ("The program printed it.", 1)])
    segments = policy_segments(ids, mask, decode)
    assert segments == [CODE, "The program printed it."]
    assert final_answer(segments) == "{{x}}"  # the policy's own last box is the f-string in its code
    assert score(segments, "42").reward == -1.0
    # the same tokens decoded as one text (the leak this design prevents) would have scored +1
    assert score([decode(ids)], "42").reward == 1.0


def test_wrong_policy_answer_is_not_rescued_by_tool_output():
    ids, mask = fake_tokens([(CODE, 1), (TOOL, 0), ("So it is \\boxed{41}.", 1)])
    assert score(policy_segments(ids, mask, decode), "42").reward == -1.0


def test_policy_answer_after_tool_output_scores_plus_one():
    ids, mask = fake_tokens([(CODE, 1), (TOOL, 0), ("So the answer is $\\boxed{42}$.", 1)])
    ids, mask = np.array(ids), np.array(mask)  # arrays and tensors (anything with .tolist()) work too
    assert score(policy_segments(ids, mask, decode), "42").reward == 1.0


def test_box_cut_off_after_a_tool_call_is_no_answer_as_in_one_segment():
    """The issue's case: a closed \\boxed{4}, a tool call, then an unclosed \\boxed{5 (the response was cut off).
    One rule for the whole policy text: the last box is unclosed, so no answer, in one segment or split."""
    first, last = "First guess \\boxed{4}.\n```python\nprint(5)\n```\n", "So it is \\boxed{5"
    ids, mask = fake_tokens([(first, 1), ("```output\n5\n```\n", 0), (last, 1)])
    split = policy_segments(ids, mask, decode)
    assert split == [first, last]
    for segments in (split, [first + last]):
        assert final_answer(segments) is None and score(segments, "4").reward == -1.0


def test_final_answer_is_the_same_however_tool_output_cuts_the_policy_text():
    """Random policy texts (closed boxes, bare boxes, prose, and sometimes an unclosed box at the end) cut between
    their pieces into 1-4 segments with tool output between: the answer is last_boxed of the whole text."""
    rng = np.random.default_rng(0)
    pieces = ["We get \\boxed{4}. ", "Check: \\boxed{\\frac{1}{2}} ", "prose ", "$\\boxed 7$ ", "\\fbox{9} ",
              "no box\n"]
    for _ in range(300):
        text = list(rng.choice(pieces, rng.integers(1, 6)))
        if rng.random() < 0.4:
            text.append(str(rng.choice(["\\boxed{5", "\\boxed{\\frac{1}{", "\\boxed"])))  # cut off
        cuts = sorted(set(rng.integers(1, len(text) + 1, rng.integers(0, 4)).tolist()))
        parts = [("".join(text[a:b]), 1) for a, b in zip([0] + cuts, cuts + [len(text)]) if a < b]
        layout = [p for part in parts for p in (part, ("```output\n\\boxed{8}\n```\n", 0))][:-1]
        segments = policy_segments(*fake_tokens(layout), decode)
        assert final_answer(segments) == final_answer(["".join(text)]) == last_boxed("".join(text)), text


def test_policy_segments_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="must match"):
        policy_segments([1, 2, 3], [1, 1], decode)


def test_score_code_penalty_and_missing_answer():
    assert score(["\\boxed{5}"], "5", failed_code=True, code_penalty=0.5).reward == 0.5
    assert score(["\\boxed{6}"], "5", failed_code=True, code_penalty=0.5) == ("6", False, -1.5)  # answer, correct
    assert score(["\\boxed{5}"], "5", failed_code=False, code_penalty=0.5).reward == 1.0
    assert score(["no box", ""], "5").reward == -1.0
    assert score([], "5").reward == -1.0


# ------------------------------------------------------------------------------------------------- equivalence

TRICKY = [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\dfrac{17}{50}", "0.34", True),
    ("0.333333", "\\frac{1}{3}", True),  # math-verify rounds to 6 places
    ("0.33", "\\frac{1}{3}", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("(3,4]", "(3, 4]", True),
    ("[3,4]", "(3,4]", False),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)", True),
    ("\\left(\\frac35,\\frac83\\right]", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", True),
    ("C", "\\text{(C)}", True),
    ("(C)", "\\text{(C)}", True),
    ("B", "\\text{(C)}", False),
    ("5", "5\\text{ cm}", True),
    ("5.4", "5.4 \\text{ cents}", True),
    ("30", "30^\\circ", True),
    ("30^{\\circ}", "30^\\circ", True),
    ("31", "30^\\circ", False),
    ("32348", "\\$32,\\!348", True),
    ("1,000", "1000", True),
    ("1,001", "1000", False),
    ("18.9", "\\$18.90", True),
    ("\\frac{9}{5}", "1\\frac{4}{5}", True),
    ("-2,1", "1,-2", True),
    ("1", "1,-2", False),
    ("6-5i", "6 - 5i", True),
    ("q-p", "p - q", False),
    ("x=5", "5", True),
    ("204", "205", False),
    ("", "5", False),
]


@pytest.mark.parametrize("pred,truth,expected", TRICKY)
def test_tricky_pairs(pred, truth, expected, verifier):
    assert is_equivalent(pred, truth, verifier=verifier) is expected


def test_fast_path_agrees_with_math_verify(verifier):
    """Wherever the exact fast path decides, math-verify alone (the reference) must say the same."""
    decided = [(p, t, _fast_equivalent(p, t)) for p, t, _ in TRICKY if p]
    decided = [(p, t, fast) for p, t, fast in decided if fast is not None]
    assert len(decided) >= 8
    for pred, truth, fast in decided:
        assert verifier.check(pred, truth) is fast, (pred, truth)


def test_hanging_check_is_cut_by_deadline_from_a_worker_thread(verifier):
    # sympy never finishes comparing 10^(10^10) with 5; math-verify's own SIGALRM timeout cannot run off the main thread
    result = {}

    def run():
        result["hang"] = is_equivalent("10^{10^{10}}", "5", timeout=1.0, verifier=verifier)
        result["after"] = is_equivalent("2\\sqrt{2}", "\\sqrt{8}", verifier=verifier)  # a fresh worker answers

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)  # a liveness bound, far above the 1 s deadline: without the deadline this never ends
    assert not thread.is_alive(), "the hanging math-verify call was not cut by its deadline"
    assert result == {"hang": False, "after": True}


def test_dead_worker_is_replaced(verifier):
    verifier.check("1", "1")  # make sure a worker is running
    worker = verifier._workers[0]
    worker.proc.kill()
    worker.proc.wait()
    assert verifier.check("\\sqrt{4}", "2") is True


def test_orphaned_hanging_worker_stops_itself():
    # if the trainer dies mid-check nobody kills the worker: its own CPU limit (timeout + 2 s) must end it
    worker = _Worker()
    worker.check("1", "1", timeout=30.0)  # start it
    worker.proc.stdin.write((json.dumps(["10^{10^{10}}", "5", 1.0]) + "\n").encode())
    assert worker.proc.wait(timeout=120) == -signal.SIGXCPU
    worker.stop()


# ------------------------------------------------------------------- notations math-verify does not read (issue 27)

REPEATING = [  # a repeating decimal is an exact rational, in each notation answers use
    ("0.\\overline{3}", "\\frac{1}{3}", True),
    ("0.1\\overline{6}", "\\frac{1}{6}", True),
    ("0.\\bar{3}", "\\frac{1}{3}", True),
    ("0.(3)", "\\frac13", True),
    ("1.(142857)", "\\frac{8}{7}", True),
    ("0.\\dot{3}", "1/3", True),
    ("0.\\dot{1}4\\dot{2}", "\\frac{142}{999}", True),             # dots over the first and last repeating digit
    ("0.3\u0305", "\\frac{1}{3}", True),                            # a combining overline
    ("0.333...", "\\frac{1}{3}", True),
    ("0.1666\\ldots", "\\frac{1}{6}", True),
    ("0.142857142857\u2026", "\\frac{1}{7}", True),
    ("-0.\\overline{6}", "-\\frac{2}{3}", True),
    ("0.\\overline{9}", "1", True),
    ("0.\\overline{3}", "0.3", False),
    ("0.\\overline{6}", "\\frac{1}{3}", False),
    ("0.\\overline{12}", "\\frac{1}{9}", False),
]
UNICODE = [  # Unicode math symbols that have a LaTeX equivalent
    ("45°", "45", True),
    ("45°", "46", False),
    ("2π", "2\\pi", True),
    ("\\frac{π}{3}", "\\frac{\\pi}{3}", True),
    ("2π", "3\\pi", False),
    ("√3", "\\sqrt{3}", True),
    ("2√2", "\\sqrt{8}", True),
    ("3×4", "12", True),
    ("12÷4", "3", True),
    ("−5", "-5", True),
    ("(−∞, 2]", "(-\\infty, 2]", True),
    ("½", "\\frac{1}{2}", True),
    ("1½", "\\frac{3}{2}", True),
    ("x²+1", "x^2+1", True),
    ("x ≤ 3", "x \\leq 3", True),
]


@pytest.mark.parametrize("pred,truth,expected", REPEATING + UNICODE)
def test_repeating_decimals_and_unicode_symbols(pred, truth, expected, verifier):
    assert is_equivalent(pred, truth, verifier=verifier) is expected
    assert is_equivalent(truth, pred, verifier=verifier) is expected  # either side may be the gold answer


def test_repeating_decimal_values_agree_with_long_division():
    """For random integer parts, fixed and repeating digits (leading zeros included), the fraction's own decimal
    expansion (long division, the independent reference) is the integer part, the fixed digits and the block over
    and over. A block of nines is left out: its expansion is the next number up (0.999... = 1, tested above)."""
    import random
    from nanotorl.notation import repeating
    rng = random.Random(0)
    checked = 0
    for _ in range(500):
        integer, fixed, block = ("".join(rng.choices("0123456789", k=rng.randint(low, 3))) for low in (0, 0, 1))
        if set(block) == {"9"}:
            continue
        value = repeating(integer, fixed, block)
        whole, rest = divmod(value.numerator, value.denominator)
        digits = ""
        for _ in range(len(fixed) + 4 * len(block)):
            digit, rest = divmod(rest * 10, value.denominator)
            digits += str(digit)
        assert (whole, digits) == (int(integer or 0), fixed + block * 4), (integer, fixed, block)
        checked += 1
    assert checked > 450
