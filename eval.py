"""Evaluate a checkpoint on math test sets with the Python tool, exactly as it rolls out in training.

    python eval.py                                        # newest demo checkpoint on the demo's held-out set
    python eval.py --model DIR --data aime24,aime25,math500 --k 16 --temperature 0.6
    torchrun --nproc_per_node=8 eval.py --model DIR --data aime24,my_set.parquet

Datasets: a path (JSONL {problem, answer} or ToRL parquet), or a name looked up in --data-dir (default
../shared/data beside the repository): the file whose stem is the name (aime24 -> aime24.jsonl), else the one
file whose stem starts with it (math500 -> math500_subset.jsonl). A dataset is named by its file stem.
Repeated problems (same text) are reported and counted once.

Every problem gets one greedy response (temperature 0) and K sampled ones; sample j of problem i (its index in
the deduplicated set) is seeded with rollout.sample_seed(seed, i, j), so results depend on neither the number
of ranks, nor the batches, nor on resuming. Per dataset (c_p of the K samples of problem p correct):
    greedy   = mean_p [greedy response correct]
    avg@K    = mean_p c_p / K                            (= pass@1)
    pass@k   = mean_p 1 - C(K - c_p, k) / C(K, k)        (unbiased, k = 1..K; nanotorl.metrics.pass_at_k)
    maj@k    = mean_p [most common of the first k answers is right]  (equivalent answers vote together)
and, over the sampled responses, the fraction that call the tool, the fraction of calls without error, calls
per response and the mean response length in tokens (tool output included); time_s is the wall time this
invocation spent on the dataset (a resumed run counts only its own).

Out dir (--out, default runs/eval/<model dir name>): settings.json (what the samples depend on: a rerun with
other settings needs another --out), samples.jsonl (every response, with its tool calls), results.json.
Each rank appends its samples to samples.rank<R>.jsonl after every chunk of problems; rank 0 merges them into
samples.jsonl at the start and at the end. A rerun reloads the samples there, keyed by (dataset, problem id,
mode, sample index), and generates only the missing ones (a larger --k adds samples). The ranks must share
the out dir (one machine, or a shared filesystem).
"""
import argparse
import json
import os
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from nanotorl import dist
from nanotorl.checkpoint import DTYPES, latest_checkpoint, load_model
from nanotorl.config import TrainConfig
from nanotorl.data import Problem, arithmetic_problems, drop_duplicates, find_duplicates, load_problems
from nanotorl.generate import Generator, SamplingParams
from nanotorl.metrics import maj_at_k, mean_pass_at_k, print_table
from nanotorl.reward import is_equivalent
from nanotorl.rollout import Draw, Sample, rollout, tool_means
from nanotorl.tokenizer import Tokenizer
from sandbox import SandboxPool

DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"
DATA_SUFFIXES = (".jsonl", ".parquet")
DEMO_SET = "arithmetic-heldout"
PAPER_MAX_NEW_TOKENS = 3072  # ToRL's response budget


# ------------------------------------------------------------------------------------------------- data


def find_data(spec: str, data_dir: Path) -> Path:
    """``spec`` if it is a file; else the file in ``data_dir`` whose stem is ``spec``; else the only one whose stem
    starts with ``spec``."""
    if Path(spec).is_file():
        return Path(spec)
    files = sorted(p for p in data_dir.iterdir() if p.suffix in DATA_SUFFIXES) if data_dir.is_dir() else []
    for matches in ([p for p in files if p.stem == spec], [p for p in files if p.stem.startswith(spec)]):
        if len(matches) > 1:
            raise ValueError(f"dataset name {spec!r} matches several files in {data_dir}: "
                             f"{[p.name for p in matches]}; give a longer name or a path")
        if matches:
            return matches[0]
    raise FileNotFoundError(f"dataset {spec!r} is not a file, and {data_dir} has no .jsonl/.parquet file named "
                            f"{spec}* (found: {[p.name for p in files] or 'none'}); pass a path or --data-dir DIR")


def load_sets(specs: list[str], data_dir: Path, skip_bad: bool, log) -> tuple[dict, dict]:
    """({name: problems without repeats}, {name: number of repeats dropped}) for dataset names or paths."""
    sets, dropped = {}, {}
    for spec in specs:
        path = find_data(spec, data_dir)
        if path.stem in sets:
            raise ValueError(f"two datasets are named {path.stem!r} (the file stem); rename one of the files")
        problems = load_problems(path, skip_bad=skip_bad)
        for reason in problems.skipped:
            log(f"skipped {reason}")
        if not problems:
            raise ValueError(f"{path} holds no problem; expected JSONL rows {{\"problem\": ..., \"answer\": ...}} "
                             f"or ToRL parquet rows")
        sets[path.stem], dropped[path.stem] = deduplicated(path.stem, problems, log)
    return sets, dropped


def deduplicated(name: str, problems: list[Problem], log) -> tuple[list[Problem], int]:
    """The problems with repeated texts dropped (each repeat reported), and how many were dropped."""
    for group in find_duplicates(problems):
        log(f"{name}: problem {problems[group[0]].id} is repeated as "
            f"{', '.join(problems[i].id for i in group[1:])}; it is evaluated and counted once")
    kept = drop_duplicates(problems)
    return kept, len(problems) - len(kept)


# ------------------------------------------------------------------------------------------ generation


def to_record(name: str, mode: str, index: int, sample: Sample, tok: Tokenizer) -> dict:
    """One scored response as a JSON-able dict (its answer comes from the policy's own tokens, see rollout)."""
    problem, completion = sample.problem, sample.completion
    return {"dataset": name, "id": problem.id, "mode": mode, "index": index, "problem": problem.problem,
            "answer": problem.answer, "response": tok.decode(completion.response_ids), "extracted": sample.answer,
            "correct": sample.correct, "reward": sample.reward,
            "tool_calls": [asdict(call) for call in completion.tool_calls],
            "finish_reason": completion.finish_reason, "response_tokens": len(completion.response_ids)}


def key(record: dict) -> tuple:
    return record["dataset"], record["id"], record["mode"], record["index"]


def generate(gen: Generator, items: list[tuple], args, progress) -> list[dict]:
    """Records for ``items`` = (dataset, problem index, problem, mode, sample index), in one rollout."""
    modes = {"greedy": SamplingParams(temperature=0.0),
             "sampled": SamplingParams(temperature=args.temperature, top_p=args.top_p)}
    draws = [Draw(p, i, j, modes[mode]) for _, i, p, mode, j in items]
    samples = rollout(gen, draws, max_new_tokens=args.max_new_tokens, max_tool_calls=args.max_tool_calls,
                      seed=args.seed, progress=progress)
    return [to_record(name, mode, j, s, gen.tokenizer) for (name, _, _, mode, j), s in zip(items, samples)]


def run_dataset(gen: Generator, name: str, problems: list[Problem], done: set, args, rank: int, world: int,
                out: Path) -> None:
    """Generate this rank's share of the missing samples of one dataset, chunk by chunk, appending each chunk's
    records to this rank's file; every rank runs the same chunks."""
    wanted = [("greedy", 0)] + [("sampled", j) for j in range(args.k)]
    todo = [[(name, i, p, mode, j) for mode, j in wanted if (name, p.id, mode, j) not in done]
            for i, p in enumerate(problems)]
    todo = [items for items in todo if items]
    per_chunk = args.chunk or max(1, 4 * args.slots * world // len(wanted))
    chunks = [dist.shard_of([it for items in todo[c:c + per_chunk] for it in items], rank, world)[0]
              for c in range(0, len(todo), per_chunk)]
    with tqdm(total=sum(map(len, chunks)), desc=name, disable=rank != 0, dynamic_ncols=True) as bar:
        for items in chunks:
            if items:
                lines = "".join(json.dumps(r) + "\n" for r in generate(gen, items, args, bar.update))
                with open(out / f"samples.rank{rank}.jsonl", "a") as f:
                    f.write(lines)
    dist.barrier()


# ------------------------------------------------------------------------------------------- sample files


def read_records(file: Path):
    """The records of one samples file. A last line without its newline was cut short by an interrupted write:
    it is skipped (and regenerated)."""
    lines = file.read_text().split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                continue
            raise ValueError(f"{file}:{n}: not a sample record ({e.msg}); delete that line to regenerate "
                             f"the sample, or the whole out dir to start over") from None


def merge_records(out: Path) -> dict:
    """Every finished sample in ``out`` by key; written back sorted to samples.jsonl, per-rank files removed."""
    files = [out / "samples.jsonl"] + sorted(out.glob("samples.rank*.jsonl"))
    records = {}
    for file in files:
        if file.is_file():
            for record in read_records(file):
                records.setdefault(key(record), record)
    tmp = out / "samples.jsonl.tmp"
    tmp.write_text("".join(json.dumps(records[k]) + "\n" for k in sorted(records)))
    os.replace(tmp, out / "samples.jsonl")
    for file in files[1:]:
        file.unlink()
    return records


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix samples made with other settings into ``out``; record the settings of a new out dir."""
    file = out / "settings.json"
    if file.is_file():
        old = json.loads(file.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out} holds samples made with other settings ({'; '.join(diff)}): pass another "
                             f"--out, or delete {out} to start over")
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(settings, indent=1))


# ----------------------------------------------------------------------------------------------- metrics


def tool_stats(records: list[dict]) -> dict:
    """Tool use and length over ``records``: rollout.tool_means, as training logs them, of the records' sums."""
    calls = [c for r in records for c in r["tool_calls"]]
    return tool_means({"n": len(records), "with_tool": sum(bool(r["tool_calls"]) for r in records),
                       "calls": len(calls), "calls_ok": sum(c["status"] == "ok" for c in calls),
                       "response_tokens": sum(r["response_tokens"] for r in records)})


def summarize(records: dict, name: str, problems: list[Problem], k: int) -> dict:
    """The metrics of one dataset (module docstring) from its records, keyed as by :func:`key`."""
    greedy = [records[(name, p.id, "greedy", 0)] for p in problems]
    sampled = [[records[(name, p.id, "sampled", j)] for j in range(k)] for p in problems]
    correct = [[r["correct"] for r in row] for row in sampled]
    equivalent = lru_cache(maxsize=None)(is_equivalent)  # maj@1..K compare the same pairs again and again
    n = len(problems)
    res = {"problems": n, "greedy": sum(r["correct"] for r in greedy) / n,
           f"avg@{k}": sum(map(sum, correct)) / (n * k)}
    res |= {f"pass@{i}": mean_pass_at_k(correct, i) for i in range(1, k + 1)}
    res |= {f"maj@{i}": sum(maj_at_k([r["extracted"] for r in row], p.answer, i, equivalent)
                            for row, p in zip(sampled, problems)) / n for i in range(1, k + 1)}
    return res | tool_stats([r for row in sampled for r in row]) | {"greedy_tools": tool_stats(greedy)}


def table_ks(k: int) -> list[int]:
    """The k shown in the table: powers of two from 2 up to K, and K."""
    return sorted({2 ** e for e in range(1, k.bit_length()) if 2 ** e <= k} | {k}) if k > 1 else []


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_results(results: dict, k: int) -> None:
    """One row per dataset: rates in percent, the pass@k of :func:`table_ks` (all k are in results.json)."""
    rows = [{"dataset": name, "n": str(r["problems"]), "greedy": pct(r["greedy"]), f"avg@{k}": pct(r[f"avg@{k}"]),
             **{f"pass@{i}": pct(r[f"pass@{i}"]) for i in table_ks(k)}, f"maj@{k}": pct(r[f"maj@{k}"]),
             "tool%": pct(r["tool_fraction"]), "ok%": pct(r["calls_ok_fraction"]),
             "calls": f"{r['calls_per_response']:.2f}", "len": f"{r['response_length']:.0f}",
             "time_s": f"{r['time_s']:.1f}"} for name, r in results.items()]
    print_table(rows, list(rows[0]))


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint with the Python tool: greedy, avg@k, "
                                            "pass@k, maj@k, tool statistics (see the module docstring)")
    p.add_argument("--model", help="checkpoint directory (default: the newest demo checkpoint)")
    p.add_argument("--data", help=f"comma-separated dataset names or paths (default: the demo's {DEMO_SET} set)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where dataset names are looked up")
    p.add_argument("--k", type=int, default=16, help="sampled responses per problem (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.6, help="of the sampled responses (%(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="of the sampled responses (%(default)s)")
    p.add_argument("--max-tool-calls", type=int, default=1, help="per response (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, help=f"response budget, tool output included (default "
                                                      f"{PAPER_MAX_NEW_TOKENS}; the demo's own for the demo)")
    p.add_argument("--trigger", choices=("fence", "output"), default="fence", help="see nanotorl.generate")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's own")
    p.add_argument("--slots", type=int, default=64, help="concurrent sequences per rank")
    p.add_argument("--cuda-graph", action="store_true", help="decode step as a CUDA graph (GPU)")
    p.add_argument("--chunk", type=int, help="problems per chunk between saves (default: 4 x slots x ranks "
                                             "samples' worth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sandbox-workers", type=int, default=4)
    p.add_argument("--sandbox-timeout", type=float, default=10.0)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows instead of stopping")
    p.add_argument("--out", type=Path, help="results directory (default runs/eval/<model dir name>)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error(f"--k must be at least 1, got {args.k}")
    return args


def demo_checkpoint() -> Path:
    """The newest complete checkpoint of the README's main job."""
    demo = TrainConfig()
    ckpt = latest_checkpoint(demo.log.out_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no demo checkpoint in {Path(demo.log.out_dir) / 'checkpoints'}: run the README's main "
                                f"job first (torchrun --nproc_per_node=2 train.py), or pass --model DIR")
    return ckpt


def demo_heldout() -> list[Problem]:
    """The held-out set the demo validates on during training."""
    cfg = TrainConfig()
    return arithmetic_problems(cfg.log.eval_problems, cfg.seed, "heldout")


def main(argv=None) -> dict | None:
    """Evaluate; return {dataset: metrics} on rank 0 (None on the other ranks)."""
    args = parse_args(argv)
    model_dir = Path(args.model) if args.model else demo_checkpoint()
    if args.max_new_tokens is None:
        args.max_new_tokens = PAPER_MAX_NEW_TOKENS if args.model else TrainConfig().rollout.max_new_tokens
    rank, world, device = dist.setup()
    log = tqdm.write if rank == 0 else (lambda _: None)
    if args.data:
        specs = [s.strip() for s in args.data.split(",") if s.strip()]
        sets, dropped = load_sets(specs, args.data_dir, args.skip_bad_rows, log)
    else:
        sets, dropped = {DEMO_SET: demo_heldout()}, {DEMO_SET: 0}
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = load_model(model_dir, dtype=DTYPES.get(args.dtype), device=device).eval()
    tok = Tokenizer(model_dir)
    out = args.out or Path("runs/eval") / model_dir.name
    settings = {"model": str(model_dir.resolve()), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    settings |= {k: getattr(args, k) for k in ("temperature", "top_p", "max_new_tokens", "max_tool_calls",
                                               "trigger", "seed")}
    if rank == 0:
        check_settings(out, settings)
        records = merge_records(out)
        log(f"evaluating {model_dir} on {', '.join(sets)} | {world} process(es) on {device.type} | out {out}"
            + (f" | {len(records)} samples reloaded" if records else ""))
    done = dist.broadcast_object(set(records) if rank == 0 else None)

    longest = max(len(tok.prompt_ids(p.problem)) for problems in sets.values() for p in problems)
    times = {}
    with SandboxPool(workers=args.sandbox_workers, wall_time=args.sandbox_timeout,
                     cpu_time=args.sandbox_timeout) as box, torch.no_grad():
        gen = Generator(model, tok, box, slots=args.slots, max_len=longest + args.max_new_tokens,
                        trigger=args.trigger, cuda_graph=args.cuda_graph)
        for name, problems in sets.items():
            t0 = time.perf_counter()
            run_dataset(gen, name, problems, done, args, rank, world, out)
            times[name] = time.perf_counter() - t0
    if rank != 0:
        dist.teardown()
        return None
    records = merge_records(out)
    results = {name: summarize(records, name, problems, args.k)
               | {"duplicates_dropped": dropped[name], "time_s": times[name]} for name, problems in sets.items()}
    (out / "results.json").write_text(json.dumps({"settings": settings | {"k": args.k}, "results": results},
                                                 indent=1))
    print_results(results, args.k)
    log(f"results in {out / 'results.json'}, every response in {out / 'samples.jsonl'}")
    dist.teardown()
    return results


if __name__ == "__main__":
    main()
