"""Evaluate a checkpoint on math test sets with the Python tool, exactly as it rolls out in training.

    python eval.py                                        # newest demo checkpoint on the demo's held-out set
    python eval.py --model DIR --data aime24,aime25,math500 --k 16 --temperature 0.6
    torchrun --nproc_per_node=8 eval.py --model DIR --data aime24,my_set.parquet
    python eval.py --model ToRL-1.5B --compat torl --data aime24,aime25,math500  # as ToRL's own code (README)

Datasets: a path (JSONL {problem, answer[, source]} or ToRL parquet), or a name looked up in --data-dir (default
../shared/data beside the repository): the file whose stem is the name (aime24 -> aime24.jsonl), else the one
file whose stem starts with it (math500 -> math500_subset.jsonl). A dataset is named by its file stem. Repeated
problems (same text) in a file are evaluated once and counted once per source: a problem that two sources of the
file share counts in both rows and once in "all". One line per file says how many rows repeated how many problems
and which sources share some; results.json lists them.

Every problem gets one greedy response (temperature 0) and K sampled ones; sample j of problem i (its index in
the deduplicated set) is seeded with rollout.sample_seed(seed, i, j), so results depend on neither the number
of ranks, nor the batches, nor on resuming. The table has one row per source (benchmark) of each file: a file
whose rows carry a source (`source` in JSONL, `data_source` in parquet; ToRL's test.parquet holds aime24, aime25
and math500) gives one row per source, a file without one is its own source named by its stem; with several rows
follow "average" (unweighted mean over the rows, as papers and ToRL report) and "all" (all problems pooled). The
columns: greedy accuracy, avg@K, unbiased pass@k, maj@k, tool use, calls without error, calls per response, mean
response length and time_s, the wall time this invocation spent on the file (a resumed run counts only its own);
nanotorl/report.py defines each and how rows are named. --markdown prints the table again in Markdown with the
settings on one line above it. The demo's held-out arithmetic is one row.

Out dir (--out, default runs/eval/<model dir name>): settings.json (what the samples depend on: a rerun with
other settings needs another --out), samples.jsonl (every response, with its tool calls), results.json: the
settings, "results" {row: metrics}, "average", "all", and "files" {dataset: path, rows, repeats (groups of ids of
one problem's rows, the first kept), shared {kept id: the sources that share it}, time_s}.
Each rank appends its samples to samples.rank<R>.jsonl after every chunk of problems; rank 0 merges them into
samples.jsonl at the start and at the end. A rerun reloads the samples there, keyed by (dataset, problem id,
mode, sample index), and generates only the missing ones (a larger --k adds samples). The ranks must share
the out dir (one machine, or a shared filesystem).
"""
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from nanotorl import cli, dist
from nanotorl.checkpoint import DTYPES, load_config, load_model
from nanotorl.training_checkpoint import latest_checkpoint
from nanotorl.config import TrainConfig
from nanotorl.decode_step import CUDA_GRAPH, use_cuda_graph
from nanotorl.data import (Problem, arithmetic_problems, drop_duplicates, find_duplicates, fit_positions,
                           load_problems, repeats_line, shared_sources)
from nanotorl.generate import Generator, SamplingParams
from nanotorl.prompt import PROMPT_TEMPLATES, parse_template_vars
from nanotorl.report import print_report, report, settings_line
from nanotorl.rollout import Draw, Sample, rollout
from nanotorl.samples import read_records, sample_record
from nanotorl.tokenizer import Tokenizer
from nanotorl.tool import COMPAT
from nanotorl.sandbox import SandboxPool

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
    """({name: problems without repeats}, {name: {"path", "rows", "repeats"}}) for dataset names or paths;
    "repeats" are the groups of ids of rows with the same problem (the first is kept), one line logged per file."""
    sets, files = {}, {}
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
        if line := repeats_line(path.stem, problems, per_source=True):
            log(f"{line} (listed in results.json)")
        sets[path.stem] = drop_duplicates(problems)
        files[path.stem] = {"path": str(path), "rows": len(problems),
                            "repeats": [[problems[i].id for i in group] for group in find_duplicates(problems)],
                            "shared": shared_sources(problems)}
    return sets, files


def fit_sets(sets: dict, tok: Tokenizer, positions: int, args, log) -> dict:
    """Each set without the problems whose prompt and --max-new-tokens pass the model's ``positions`` (one line
    per set says how many, from which sources), or a ValueError (--long-prompts refuse)."""
    out = {}
    for name, problems in sets.items():
        lengths = [len(tok.prompt_ids(p.problem)) for p in problems]
        out[name], line = fit_positions(name, problems, lengths, args.max_new_tokens, positions,
                                        args.long_prompts == "refuse")
        if line:
            log(line)
        if not out[name]:
            raise ValueError(f"{name}: no problem fits the model's {positions} positions with --max-new-tokens "
                             f"{args.max_new_tokens}; lower --max-new-tokens")
    return out


# ------------------------------------------------------------------------------------------ generation


def to_record(name: str, mode: str, index: int, sample: Sample, tok: Tokenizer) -> dict:
    """One scored response as training keeps it (nanotorl.samples; its answer comes from the policy's own tokens,
    see rollout), plus its dataset, mode and sample index."""
    return sample_record(sample, tok, dataset=name, mode=mode, index=index)


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


def merge_records(out: Path) -> dict:
    """Every finished sample in ``out`` by key (a record cut short by an interrupted write is skipped, and so
    regenerated); written back sorted to samples.jsonl, per-rank files removed."""
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


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Evaluate a checkpoint with the Python tool: greedy, avg@k, "
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
    p.add_argument("--trigger", choices=("fence", "output"), help="see nanotorl.generate (default: fence; output "
                                                                  "with --compat torl)")
    p.add_argument("--compat", choices=COMPAT, default="none", help="torl: ToRL's own prompt, trigger, observation "
                                                                    "and budget rules (README, ToRL-exact mode)")
    p.add_argument("--prompt-template", choices=PROMPT_TEMPLATES, default="torl",
                   help="torl: the paper's base-model prompt; chat: the checkpoint's chat template (as in training)")
    p.add_argument("--template-vars", default="", help="JSON object for the chat template, e.g. "
                                                       "'{\"enable_thinking\": false}' (as in training)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's own")
    p.add_argument("--slots", type=int, default=64, help="concurrent sequences per rank")
    p.add_argument("--cuda-graph", choices=CUDA_GRAPH, default="auto", help="decode step as a CUDA graph: auto = on "
                   "CUDA (a failed capture decodes eagerly, with a warning that says why), eagerly elsewhere")
    p.add_argument("--compile", action="store_true", help="CPU: decode through the compiled forward (torch.compile, "
                   "nanotorl/compiled_decode.py): faster steps, but compiling costs seconds to tens of seconds, so it "
                   "pays off only on long runs (the demo's eval: 2.6 s eager, 40.6 s compiled, 7.9 s with inductor's "
                   "cache warm)")
    p.add_argument("--chunk", type=int, help="problems per chunk between saves (default: 4 x slots x ranks "
                                             "samples' worth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sandbox-workers", type=int, default=4)
    p.add_argument("--sandbox-timeout", type=float, default=10.0)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows instead of stopping")
    p.add_argument("--long-prompts", choices=("drop", "refuse"), default="drop",
                   help="a problem whose prompt plus --max-new-tokens passes the model's positions "
                        "(max_position_embeddings): drop it with one line per dataset, or refuse to start")
    p.add_argument("--out", type=Path, help="results directory (default runs/eval/<model dir name>)")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown, settings above it")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (else one line)")
    args = p.parse_args(argv)
    args.trigger = args.trigger or ("output" if args.compat == "torl" else "fence")
    if args.k < 1:
        p.error(f"--k must be at least 1, got {args.k}")
    try:
        args.template_vars = parse_template_vars(args.template_vars)
    except ValueError as e:
        p.error(str(e))
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


def write_results(out: Path, sets: dict, files: dict, times: dict, settings: dict, args, model_dir: Path) -> dict:
    """Rank 0, once every sample is in: results.json (module docstring) and the table, then a warning if tool calls
    failed in the sandbox itself; returns what it wrote."""
    records = merge_records(out)
    shared = {(name, pid): sources for name, file in files.items() for pid, sources in file["shared"].items()}
    rep = report(records, sets, args.k, times, shared)
    rep = {"settings": settings | {"k": args.k}} | rep | {
        "files": {name: files.get(name, {}) | {"time_s": times[name]} for name in sets}}
    (out / "results.json").write_text(json.dumps(rep, indent=1))
    print_report(rep, args.k, settings_line(str(model_dir), settings, args.k) if args.markdown else None)
    calls = [c for r in records.values() for c in r["tool_calls"]]
    infra = [c["observation"] for c in calls if c.get("infra_error")]
    if infra:
        print(f"warning: {len(infra)} of {len(calls)} tool calls failed in the sandbox itself, not in the code (e.g. "
              f"{infra[0]!r}): the results understate the model; delete their samples from {out / 'samples.jsonl'} "
              f"and run again to redo them")
    return rep


def main(argv=None) -> dict | None:
    """Evaluate; return what results.json holds on rank 0 (None on the other ranks)."""
    args = parse_args(argv)
    model_dir = Path(args.model) if args.model else demo_checkpoint()
    if args.max_new_tokens is None:
        args.max_new_tokens = PAPER_MAX_NEW_TOKENS if args.model else TrainConfig().rollout.max_new_tokens
    rank, world, device = dist.setup()
    log = tqdm.write if rank == 0 else (lambda _: None)
    if args.data:
        specs = [s.strip() for s in args.data.split(",") if s.strip()]
        sets, files = load_sets(specs, args.data_dir, args.skip_bad_rows, log)
    else:  # one row: its sources are kinds of arithmetic, not benchmarks
        sets, files = {DEMO_SET: [replace(p, source=DEMO_SET) for p in demo_heldout()]}, {}
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    positions = load_config(model_dir).max_position_embeddings  # names a missing config.json before the tokenizer
    tok = Tokenizer(model_dir, args.prompt_template, args.template_vars, args.compat)
    sets = fit_sets(sets, tok, positions, args, log)
    model = load_model(model_dir, dtype=DTYPES.get(args.dtype), device=device, vocab=tok.vocab_size).eval()
    out = args.out or Path("runs/eval") / model_dir.name
    settings = {"model": str(model_dir.resolve()), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    settings |= {k: getattr(args, k) for k in ("temperature", "top_p", "max_new_tokens", "max_tool_calls",
                                               "trigger", "compat", "seed", "prompt_template", "template_vars")}
    if rank == 0:
        check_settings(out, settings)
        records = merge_records(out)
        log(f"evaluating {model_dir} on {', '.join(sets)} | {world} process(es) on {device.type} | out {out}"
            + (f" | {len(records)} samples reloaded" if records else ""))
        first = next(iter(sets.values()))[0].problem
        log(f"prompt of the first problem ({args.prompt_template}):\n{tok.prompt(first)}")
    done = dist.broadcast_object(set(records) if rank == 0 else None)

    longest = max(len(tok.prompt_ids(p.problem)) for problems in sets.values() for p in problems)
    times = {}
    with SandboxPool(workers=args.sandbox_workers, wall_time=args.sandbox_timeout,
                     cpu_time=args.sandbox_timeout) as box, torch.no_grad():
        gen = Generator(model, tok, box, slots=args.slots, max_len=longest + args.max_new_tokens,
                        trigger=args.trigger, cuda_graph=use_cuda_graph(args.cuda_graph, device), compat=args.compat,
                        compile=args.compile)
        for name, problems in sets.items():
            t0 = time.perf_counter()
            run_dataset(gen, name, problems, done, args, rank, world, out)
            times[name] = time.perf_counter() - t0
    if rank != 0:
        dist.teardown()
        return None
    results = write_results(out, sets, files, times, settings, args, model_dir)
    log(f"results in {out / 'results.json'}, every response in {out / 'samples.jsonl'}; to read them: "
        f"python -m nanotorl.view {out}")
    dist.teardown()
    return results


if __name__ == "__main__":
    dist.end_process(cli.run(main))
