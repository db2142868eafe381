"""Sampling metrics for evaluation: unbiased pass@k and majority vote (maj@k), the unweighted mean over sources
(benchmarks), and the table (text or Markdown) that eval.py and the benchmarks print them in.

pass@k is the probability that at least one of k samples, drawn without replacement from the n generated for a
problem (c of them correct), is correct (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form avoids huge binomials. It is not "any of the first k samples is correct", which has the same
mean but a much larger variance.
"""

from collections.abc import Callable

from nanotorl.reward import is_equivalent


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct (1 <= k <= n, 0 <= c <= n)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k} with n={n} samples; generate at least k samples")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in [0, n={n}], got c={c}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    miss = 1.0  # C(n - c, k) / C(n, k)
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: list[list[bool]], k: int) -> float:
    """pass@k averaged over problems; correct[p][s] says whether sample s of problem p is right."""
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one problem, got an empty list")
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def maj_at_k(answers: list[str | None], truth: str, k: int,
             equivalent: Callable[[str, str], bool] = is_equivalent) -> bool:
    """Is the most common of the first k answers equivalent to the truth?

    answers: extracted final answers, None where a sample gave none (such samples do not vote). Answers are
    grouped by `equivalent` (so "0.5" and "\\frac12" vote together); the largest group wins, a tie goes to the
    group whose first answer came earliest. No answer at all counts as wrong.
    """
    if k < 1 or k > len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= len(answers), got k={k} with {len(answers)} answers")
    groups: list[list[str]] = []  # each group: equivalent answers, first one is the representative
    for answer in answers[:k]:
        if answer is None:
            continue
        for group in groups:
            if equivalent(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return False
    winner = max(groups, key=len)  # max keeps the first of equal-sized groups, i.e. the earliest
    return equivalent(winner[0], truth)


def source_mean(rows: list[dict]) -> dict:
    """The unweighted mean over sources of every metric of ``rows`` (one dict of metrics per source, same keys), as
    papers and ToRL's validation ("average") report it: each benchmark counts once, whatever its size.

        mean[m] = sum_s rows[s][m] / |{s : rows[s][m] is not None}|

    A metric that is None for a source (undefined there, e.g. the fraction of tool calls without error when no
    response called the tool) is left out of that metric's mean; None if no source defines it. Nested dicts are
    averaged key by key."""
    if not rows:
        raise ValueError("source_mean needs the metrics of at least one source, got none")
    mean = {}
    for key, value in rows[0].items():
        values = [r[key] for r in rows if r[key] is not None]
        if isinstance(value, dict):
            mean[key] = source_mean(values)
        else:
            mean[key] = sum(values) / len(values) if values else None
    return mean


def print_table(rows: list[dict], columns: list[str], markdown: bool = False) -> None:
    """Print ``rows`` as an aligned text table with the given columns, or as a Markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if markdown:
        for line in [columns, ["---"] * len(columns), *cells]:
            print("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |")
        return
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
