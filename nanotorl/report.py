"""What eval.py reports: the metrics of scored responses, one row per source (benchmark), their unweighted average and
the pooled row, as a text table and, on request, a Markdown one.

Metrics of a set of problems (c_p of the K sampled responses of problem p correct):
    greedy   = mean_p [greedy response correct]
    avg@K    = mean_p c_p / K                            (= pass@1)
    pass@k   = mean_p 1 - C(K - c_p, k) / C(K, k)        (unbiased, k = 1..K; nanotorl.metrics.pass_at_k)
    maj@k    = mean_p [most common of the first k answers is right]  (equivalent answers vote together)
and, over the sampled responses, the fraction that call the tool, the fraction of calls without error, calls per
response and the mean response length in tokens (tool output included); the same for the greedy responses
under "greedy_tools".

Rows. A problem belongs to a dataset (one file, named by its stem, deduplicated on its own) and to a source (its
`source` in JSONL, `data_source` in parquet, the file stem when it has none), or to several: a problem that rows
of several sources of one file hold (benchmarks overlap: MATH500 subsets, AMC/AIME reprints) is generated once
and counts in the row of each of those sources, and once in "all". There is one row per source of each
dataset, in the order the sources first appear, named by the source, or "<dataset>/<source>" when several datasets
have that source (rows of two files are never merged). With several rows come two more:
    average  = every metric's unweighted mean over the rows (nanotorl.metrics.source_mean): each benchmark counts
               once, as papers print it beside their benchmarks and ToRL's validation logs "average"
    all      = every metric over all problems pooled: each problem counts once
time_s is the wall time spent on a row's dataset when the row is the whole dataset (None for a part of one), the
total in "all".
"""
from collections import Counter
from functools import lru_cache

from nanotorl.data import Problem
from nanotorl.metrics import maj_at_k, mean_pass_at_k, print_table, source_mean
from nanotorl.reward import is_equivalent
from nanotorl.rollout import tool_means

COUNTS = ("dataset", "sources", "problems", "time_s")  # what a row holds besides its metrics


def tool_stats(records: list[dict]) -> dict:
    """Tool use and length over ``records``: rollout.tool_means, as training logs them, of the records' sums."""
    calls = [c for r in records for c in r["tool_calls"]]
    return tool_means({"n": len(records), "with_tool": sum(bool(r["tool_calls"]) for r in records),
                       "calls": len(calls), "calls_ok": sum(c["status"] == "ok" for c in calls),
                       "response_tokens": sum(r["response_tokens"] for r in records)})


def summarize(records: dict, members: list[tuple[str, Problem]], k: int, equivalent=None) -> dict:
    """The metrics (module docstring) of the problems ``members``, each as (dataset, problem), from the records
    keyed by (dataset, problem id, "greedy" or "sampled", sample index). ``equivalent``: the answer check maj@k
    uses (default: a cached ``reward.is_equivalent``; pass one cache to rows that share problems)."""
    greedy = [records[(name, p.id, "greedy", 0)] for name, p in members]
    sampled = [[records[(name, p.id, "sampled", j)] for j in range(k)] for name, p in members]
    correct = [[r["correct"] for r in row] for row in sampled]
    equivalent = equivalent or answer_check()
    n = len(members)
    res = {"problems": n, "greedy": sum(r["correct"] for r in greedy) / n,
           f"avg@{k}": sum(map(sum, correct)) / (n * k)}
    res |= {f"pass@{i}": mean_pass_at_k(correct, i) for i in range(1, k + 1)}
    res |= {f"maj@{i}": sum(maj_at_k([r["extracted"] for r in row], p.answer, i, equivalent)
                            for row, (_, p) in zip(sampled, members)) / n for i in range(1, k + 1)}
    return res | tool_stats([r for row in sampled for r in row]) | {"greedy_tools": tool_stats(greedy)}


def answer_check():
    """``reward.is_equivalent`` with a cache: maj@1..K, and the "all" row after the source rows, compare the same
    pairs again and again (a miss can cost a math-verify run)."""
    return lru_cache(maxsize=None)(is_equivalent)


def source_rows(sets: dict[str, list[Problem]], shared: dict | None = None) -> dict[str, list[tuple[str, Problem]]]:
    """{row name: its problems as (dataset, problem)}: one row per source of each dataset (module docstring);
    ``shared`` = {(dataset, problem id): its sources} for a problem that several sources of its dataset share."""
    shared = shared or {}
    sources = {name: [shared.get((name, p.id), [p.source]) for p in problems] for name, problems in sets.items()}
    holders = Counter(s for lists in sources.values() for s in {s for of_p in lists for s in of_p})
    rows = {}
    for name, problems in sets.items():
        for p, of_p in zip(problems, sources[name]):
            for s in of_p:
                rows.setdefault(s if holders[s] == 1 else f"{name}/{s}", []).append((name, p))
    return rows


def report(records: dict, sets: dict[str, list[Problem]], k: int, times: dict[str, float],
           shared: dict | None = None) -> dict:
    """{"results": {row name: its dataset, metrics and time}, "average": ..., "all": ...} (module docstring) for the
    deduplicated problems of every dataset in ``sets``, ``times`` = {dataset: seconds spent on it}; ``shared``: see
    :func:`source_rows`."""
    rows, equivalent = source_rows(sets, shared), answer_check()
    results = {}
    for row, members in rows.items():
        name = members[0][0]
        time_s = times[name] if len(members) == len(sets[name]) else None
        results[row] = {"dataset": name} | summarize(records, members, k, equivalent) | {"time_s": time_s}
    metrics = [{key: v for key, v in r.items() if key not in COUNTS} for r in results.values()]
    everything = [(name, p) for name, problems in sets.items() for p in problems]  # a shared problem once
    return {"results": results,
            "average": {"sources": len(results), "problems": len(everything)} | source_mean(metrics)
            | {"time_s": None},
            "all": summarize(records, everything, k, equivalent) | {"time_s": sum(times.values())}}


def table_ks(k: int) -> list[int]:
    """The k shown in the table: powers of two from 2 up to K, and K."""
    return sorted({2 ** e for e in range(1, k.bit_length()) if 2 ** e <= k} | {k}) if k > 1 else []


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def settings_line(model: str, settings: dict, k: int) -> str:
    """The settings a table's numbers depend on, in words, for the line above a Markdown table."""
    return (f"model {model}, k = {k} samples per problem (temperature {settings['temperature']}, top-p "
            f"{settings['top_p']}) and one greedy, at most {settings['max_new_tokens']} new tokens and "
            f"{settings['max_tool_calls']} tool call(s) per response")


def print_report(rep: dict, k: int, markdown_above: str | None = None) -> None:
    """The rows of :func:`report` (average and all only with several rows): rates in percent, the pass@k of
    :func:`table_ks` (all k are in results.json). With ``markdown_above``, then that line and a Markdown table."""
    named = list(rep["results"].items())
    named += [("average", rep["average"]), ("all", rep["all"])] if len(named) > 1 else []
    rows = [{"source": name, "n": str(r["problems"]), "greedy": pct(r["greedy"]), f"avg@{k}": pct(r[f"avg@{k}"]),
             **{f"pass@{i}": pct(r[f"pass@{i}"]) for i in table_ks(k)}, f"maj@{k}": pct(r[f"maj@{k}"]),
             "tool%": pct(r["tool_fraction"]), "ok%": pct(r["calls_ok_fraction"]),
             "calls": f"{r['calls_per_response']:.2f}", "len": f"{r['response_length']:.0f}",
             "time_s": "-" if r["time_s"] is None else f"{r['time_s']:.1f}"} for name, r in named]
    print_table(rows, list(rows[0]))
    if markdown_above is not None:
        print(f"\n{markdown_above}\n")
        print_table(rows, list(rows[0]), markdown=True)
