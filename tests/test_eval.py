"""eval.py: metrics on hand-built samples, records from hand-built completions, dataset lookup, duplicates, bad
files, resuming after an interruption (counting generated requests), the no-argument mode, and the CLI end to end
on a tiny random checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
from conftest import REPO, ScriptedPolicy, make_chat_checkpoint, needs_cxx, shared_path
from nanotorl.checkpoint import save_model
from nanotorl.compiled_decode import CompiledDecode
from nanotorl.config import TrainConfig
from nanotorl.data import Problem, arithmetic_problems, load_problems, torl_prompt
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Completion, Generator, ToolCall
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.rollout import score_completion
from nanotorl.samples import read_records
from nanotorl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Qwen2 with the demo tokenizer; weights large enough that its logits are not near ties."""
    path = tmp_path_factory.mktemp("ckpt")
    save_demo_tokenizer(path)
    cfg = Qwen2Config(vocab_size=Tokenizer(path).vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = Qwen2(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    save_model(model, path, tokenizer_dir=path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def small_set(tmp_path, n=6) -> Path:
    rows = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in arithmetic_problems(n, 3, "heldout")]
    return write_jsonl(tmp_path / "arith.jsonl", rows)


FAST = ["--max-new-tokens", "6", "--slots", "8", "--sandbox-workers", "1"]


# --------------------------------------------------------------------------------------------------- records


def test_record_answer_from_policy_tokens_and_tool_calls_kept(ckpt):
    tok = Tokenizer(ckpt)
    parts = [("```python\nprint(2)\n```\n", 1), ("```output\n\\boxed{9}\n```\n", 0), ("So \\boxed{2}", 1)]
    ids = [tok.encode(text) for text, _ in parts]
    mask = [m for (_, m), i in zip(parts, ids) for _ in i]
    call = ToolCall("print(2)\n", "ok", "\\boxed{9}", 0.01)
    c = Completion([1], [i for part in ids for i in part], mask, [0.0] * len(mask), [call], "eos")
    r = ev.to_record("d", "sampled", 3, score_completion(Problem("p", "What?", "9"), c, tok.decode), tok)
    assert r["response"] == "".join(text for text, _ in parts)  # the full text, tool block included
    assert r["extracted"] == "2" and r["correct"] is False and r["reward"] == -1.0  # printed 9 is not the answer
    assert r["tool_calls"] == [{"code": "print(2)\n", "status": "ok", "observation": "\\boxed{9}", "wall_time": 0.01,
                               "error_kind": None, "infra_error": False}]
    assert (r["id"], r["mode"], r["index"], r["finish_reason"], r["response_tokens"]) == ("p", "sampled", 3, "eos",
                                                                                          len(mask))


# ------------------------------------------------------------------------------------------------------ data


def test_dataset_lookup_exact_stem_then_prefix(tmp_path):
    for name in ("aime24.jsonl", "aime24_extra.jsonl", "math500_subset.jsonl", "torl_test.parquet", "notes.txt"):
        (tmp_path / name).write_text("")
    assert ev.find_data("aime24", tmp_path) == tmp_path / "aime24.jsonl"  # exact stem wins over two prefixes
    assert ev.find_data("math500", tmp_path) == tmp_path / "math500_subset.jsonl"
    assert ev.find_data("torl", tmp_path) == tmp_path / "torl_test.parquet"
    assert ev.find_data(str(tmp_path / "notes.txt"), Path("/nowhere")) == tmp_path / "notes.txt"  # a path
    with pytest.raises(ValueError, match="aime24.jsonl.*aime24_extra.jsonl"):
        ev.find_data("aime", tmp_path)
    with pytest.raises(FileNotFoundError, match="gsm8k.*math500_subset.jsonl"):
        ev.find_data("gsm8k", tmp_path)
    with pytest.raises(FileNotFoundError, match="notes"):  # only .jsonl and .parquet files are datasets
        ev.find_data("notes", tmp_path)


def test_duplicates_reported_and_counted_once(tmp_path, ckpt, capsys):
    rows = [{"id": "x1", "problem": "What is 2 + 3?", "answer": "5"},
            {"id": "x2", "problem": "What is 4 * 4?", "answer": "16"},
            {"id": "x3", "problem": "What is  2 + 3?\n", "answer": "5"}]
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    res = ev.main(["--model", str(ckpt), "--data", str(data), "--k", "1", "--out", str(tmp_path / "out"), *FAST])
    assert "dup: 1 of 3 rows repeat 1 problems; each problem is evaluated" in capsys.readouterr().out
    assert res["results"]["dup"]["problems"] == 2 and res["files"]["dup"]["repeats"] == [["x1", "x3"]]
    ids = {json.loads(line)["id"] for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()}
    assert ids == {"x1", "x2"}


def test_sources_that_share_problems_each_keep_their_row(tmp_path, ckpt, capsys):
    """alpha has 4 problems; beta's 3 and gamma's 2 are all alpha's too (as MATH500 subsets and AIME reprints are):
    every source keeps its row with all of its problems, each problem is generated once and counts once in 'all',
    and the line says which sources share what."""
    texts = [f"What is {i} + {i}?" for i in range(4)]
    rows = ([(t, "alpha") for t in texts] + [(t, "beta") for t in texts[:3]] + [(t, "gamma") for t in texts[::3]]
            + [(texts[1], "beta")])  # and one repeat within beta
    data = write_jsonl(tmp_path / "mix.jsonl", [{"problem": t, "answer": "0", "source": s} for t, s in rows])
    res = ev.main(["--model", str(ckpt), "--data", str(data), "--k", "1", "--out", str(tmp_path / "out"), *FAST])
    assert ("mix: 6 of 10 rows repeat 4 problems (2 shared by alpha and beta, 1 by alpha, beta and gamma, 1 by alpha "
            "and gamma); each problem is evaluated once") in capsys.readouterr().out
    assert {row: r["problems"] for row, r in res["results"].items()} == {"alpha": 4, "beta": 3, "gamma": 2}
    assert res["all"]["problems"] == 4 and res["average"]["sources"] == 3
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 2  # one greedy and one sampled response per problem, whatever its sources
    greedy = {r["problem"]: r["correct"] for r in samples if r["mode"] == "greedy"}
    for source, members in (("alpha", texts), ("beta", texts[:3]), ("gamma", texts[::3])):
        assert res["results"][source]["greedy"] == pytest.approx(sum(greedy[t] for t in members) / len(members))
    rows = [res["results"][s]["greedy"] for s in ("alpha", "beta", "gamma")]
    assert res["average"]["greedy"] == pytest.approx(sum(rows) / 3)


@pytest.mark.parametrize("bad, message", [
    ('{"problem": "What is 1 + 1?"}', r"bad\.jsonl:2: missing field"),
    ('{"problem": "What is 1 + 1?", "answer": ', r"bad\.jsonl:2: not valid JSON")])
def test_bad_data_file_names_file_and_line(tmp_path, ckpt, bad, message):
    data = write_jsonl(tmp_path / "bad.jsonl", ['{"problem": "What is 2 + 2?", "answer": "4"}', bad])
    with pytest.raises(ValueError, match=message):
        ev.main(["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "out")])


def test_no_arguments_without_demo_checkpoint_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs/demo/checkpoints.*README's main job"):
        ev.main([])


def test_no_arguments_evaluates_newest_demo_checkpoint_on_demo_heldout(tmp_path, ckpt, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for step in ("step_000001", "step_000002"):
        shutil.copytree(ckpt, tmp_path / "runs/demo/checkpoints" / step)
        (tmp_path / "runs/demo/checkpoints" / step / "trainer.pt").write_bytes(b"")
    heldout = ev.demo_heldout()
    assert len(heldout) == TrainConfig().log.eval_problems and all(p.source.startswith("arithmetic") for p in heldout)
    heldout = heldout[:12]  # a prefix keeps the run short
    monkeypatch.setattr(ev, "demo_heldout", lambda: heldout)
    res = ev.main(["--k", "1", "--max-new-tokens", "2", "--slots", "64", "--sandbox-workers", "1"])
    assert list(res["results"]) == ["arithmetic-heldout"]  # one row, not one per kind of arithmetic
    assert res["results"]["arithmetic-heldout"]["problems"] == len(heldout)
    assert "step_000002 on arithmetic-heldout" in capsys.readouterr().out
    ids = {json.loads(line)["id"] for line in Path("runs/eval/step_000002/samples.jsonl").read_text().splitlines()}
    assert ids == {p.id for p in heldout}


# --------------------------------------------------------------------------------------------------- sources


K = 4
# source: [(name, greedy right, which of the K samples are right)]; wrong answers all say -1, so they vote together
SOURCES = {"alpha": [("a1", True, "1111"), ("a2", False, "1000"), ("a3", True, "0000")],
           "beta": [("b1", False, "0110"), ("b2", False, "0000")],
           "gamma": [("g1", True, "1010"), ("g2", True, "1111"), ("g3", True, "0001"), ("g4", False, "1100")]}
ROWS = ["a1", "b1", "g1", "a2", "g2", "a1", "a3", "g3", "b2", "g4", "a2", "g4", "a1"]  # 4 rows repeat 3 problems
TEXT = {name: f"What is {i} + {i}? ({name})" for i, name in enumerate(ROWS[:3] + ["a2", "g2", "a3", "g3", "b2", "g4"])}
PLAN = {TEXT[name]: (str(2 * int(TEXT[name].split()[2])), greedy, right)
        for problems in SOURCES.values() for name, greedy, right in problems}
SOURCE_OF = {name: source for source, problems in SOURCES.items() for name, _, _ in problems}


def respond(problem: str, sample: int | None):
    """The planned response: right or -1; alpha's first sample calls the tool and fails, every beta sample calls it."""
    answer, greedy, right = PLAN[problem]
    ok = greedy if sample is None else right[sample] == "1"
    source = SOURCE_OF[problem.split("(")[1][:-1]]
    calls = [] if sample is None else {"alpha": [ToolCall("1/0", "error", "ZeroDivisionError", 0.0)] * (sample == 0),
                                       "beta": [ToolCall("print(1)", "ok", "1", 0.0)], "gamma": []}[source]
    return f"\\boxed{{{answer if ok else -1}}}", calls


# Counted by hand from SOURCES (pass@k = 1 - C(K-c, k)/C(K, k); maj@k ties go to the answer that came first).
EXPECTED = {
    "alpha": {"problems": 3, "greedy": 2 / 3, "avg@4": 5 / 12, "pass@1": 5 / 12, "pass@2": (1 + 1 / 2) / 3,
              "pass@3": (1 + 3 / 4) / 3, "pass@4": 2 / 3, "maj@1": 2 / 3, "maj@2": 2 / 3, "maj@3": 1 / 3,
              "maj@4": 1 / 3, "tool_fraction": 3 / 12, "calls_ok_fraction": 0.0, "calls_per_response": 3 / 12},
    "beta": {"problems": 2, "greedy": 0.0, "avg@4": 2 / 8, "pass@1": 2 / 8, "pass@2": (5 / 6) / 2, "pass@3": 1 / 2,
             "pass@4": 1 / 2, "maj@1": 0.0, "maj@2": 0.0, "maj@3": 1 / 2, "maj@4": 0.0,
             "tool_fraction": 1.0, "calls_ok_fraction": 1.0, "calls_per_response": 1.0},
    "gamma": {"problems": 4, "greedy": 3 / 4, "avg@4": 9 / 16, "pass@1": 9 / 16,
              "pass@2": (5 / 6 + 1 + 1 / 2 + 5 / 6) / 4, "pass@3": (1 + 1 + 3 / 4 + 1) / 4, "pass@4": 1.0,
              "maj@1": 3 / 4, "maj@2": 3 / 4, "maj@3": 3 / 4, "maj@4": 3 / 4,
              "tool_fraction": 0.0, "calls_ok_fraction": None, "calls_per_response": 0.0}}
AVERAGE = {"greedy": (2 / 3 + 0 + 3 / 4) / 3, "avg@4": (5 / 12 + 1 / 4 + 9 / 16) / 3, "pass@4": (2 / 3 + 1 / 2 + 1) / 3,
           "maj@4": (1 / 3 + 0 + 3 / 4) / 3, "tool_fraction": (1 / 4 + 1 + 0) / 3, "calls_ok_fraction": (0 + 1) / 2}
ALL = {"problems": 9, "greedy": 5 / 9, "avg@4": 16 / 36, "pass@4": 7 / 9, "maj@4": 4 / 9, "tool_fraction": 11 / 36,
       "calls_ok_fraction": 8 / 11}


def write_multi(path: Path) -> Path:
    """ROWS as a JSONL file with `source` or a ToRL parquet file with `data_source`, by the suffix of ``path``."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, [{"problem": TEXT[n], "answer": PLAN[TEXT[n]][0], "source": SOURCE_OF[n]}
                                  for n in ROWS])
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"data_source": SOURCE_OF[n], "prompt": [{"role": "user", "content": torl_prompt(TEXT[n])}],
             "reward_model": {"ground_truth": PLAN[TEXT[n]][0], "style": "rule"}} for n in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def scripted(monkeypatch, ckpt):
    policy = ScriptedPolicy(Tokenizer(ckpt), list(PLAN), respond)
    monkeypatch.setattr(Generator, "generate", lambda gen, requests, progress=None: policy.generate(requests))


def table_cells(text: str, first: str) -> list[list[str]]:
    """The cells of the rows of the text table whose first cell is ``first`` (the header) and of those after it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    return [line.split() for line in lines[start:] if line and not line.startswith(("results in", "|"))][:6]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_one_row_per_source_average_and_all_against_hand_count(tmp_path, ckpt, monkeypatch, capsys, suffix):
    data = write_multi(tmp_path / f"multi{suffix}")
    scripted(monkeypatch, ckpt)
    res = ev.main(["--model", str(ckpt), "--data", str(data), "--k", str(K), "--out", str(tmp_path / "out"), *FAST])
    out = capsys.readouterr().out
    assert list(res["results"]) == ["alpha", "beta", "gamma"]
    tok = Tokenizer(ckpt)
    for source, expected in EXPECTED.items():
        row = res["results"][source]
        assert {key: row[key] for key in expected} == pytest.approx(expected), source
        lengths = [len(tok.encode(respond(TEXT[n], j)[0])) for n, _, _ in SOURCES[source] for j in range(K)]
        assert row["response_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert row["dataset"] == "multi" and row["time_s"] is None  # a part of its file
    assert {key: res["average"][key] for key in AVERAGE} == pytest.approx(AVERAGE)
    assert res["average"]["response_length"] == pytest.approx(
        sum(res["results"][s]["response_length"] for s in SOURCES) / 3)
    assert {key: res["all"][key] for key in ALL} == pytest.approx(ALL)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(res))

    # the repeats: one line, the list in results.json (ids are "<stem>-<row - 1>" in both formats)
    assert [line for line in out.splitlines() if "repeat" in line] == [
        "multi: 4 of 13 rows repeat 3 problems; each problem is evaluated once and counted in the row of each source "
        "that has it, once in 'all' (listed in results.json)"]
    assert res["files"]["multi"]["repeats"] == [["multi-000", "multi-005", "multi-012"], ["multi-003", "multi-010"],
                                                ["multi-009", "multi-011"]]
    assert res["files"]["multi"]["rows"] == 13 and res["files"]["multi"]["time_s"] > 0
    cells = table_cells(out, "source")
    assert [row[:3] for row in cells] == [["source", "n", "greedy"], ["alpha", "3", "66.7"], ["beta", "2", "0.0"],
                                          ["gamma", "4", "75.0"], ["average", "9", "47.2"], ["all", "9", "55.6"]]
    assert not any(line.startswith("|") for line in out.splitlines())  # no Markdown unless asked for


def test_markdown_table_with_settings_line(tmp_path, ckpt, monkeypatch, capsys):
    data = write_multi(tmp_path / "multi.jsonl")
    scripted(monkeypatch, ckpt)
    ev.main(["--model", str(ckpt), "--data", str(data), "--k", str(K), "--temperature", "0.7", "--markdown",
             "--out", str(tmp_path / "out"), *FAST])
    out = capsys.readouterr().out.splitlines()
    md = [line for line in out if line.startswith("|")]
    settings = out[out.index(md[0]) - 2]
    assert settings == (f"model {ckpt}, k = 4 samples per problem (temperature 0.7, top-p 1.0) and one greedy, at most "
                        f"6 new tokens and 1 tool call(s) per response") and out[out.index(md[0]) - 1] == ""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in md]
    assert rows[1] == ["---"] * len(rows[0])
    assert [rows[0]] + rows[2:] == table_cells("\n".join(out), "source")  # the same cells as the text table


def test_several_files_with_and_without_sources(tmp_path, ckpt, monkeypatch):
    """x: alpha and beta rows; y: beta rows and rows without a source; z: no source. beta is in two files, so
    its rows are named by file; z is a whole file, so its row has the file's time."""
    rows = lambda names, sources: [{"problem": TEXT[n], "answer": PLAN[TEXT[n]][0]} | ({"source": s} if s else {})
                                   for n, s in zip(names, sources)]
    x = write_jsonl(tmp_path / "x.jsonl", rows(["a1", "b1", "a2"], ["alpha", "beta", "alpha"]))
    y = write_jsonl(tmp_path / "y.jsonl", rows(["b2", "g1", "g2"], ["beta", None, ""]))
    z = write_jsonl(tmp_path / "z.jsonl", rows(["g3", "g4", "g4"], [None, None, None]))
    scripted(monkeypatch, ckpt)
    res = ev.main(["--model", str(ckpt), "--data", f"{x},{y},{z}", "--k", str(K), "--out", str(tmp_path / "out"),
                   *FAST])
    got = {name: (r["dataset"], r["problems"], r["greedy"]) for name, r in res["results"].items()}
    assert got == {"alpha": ("x", 2, 1 / 2), "x/beta": ("x", 1, 0.0), "y/beta": ("y", 1, 0.0), "y": ("y", 2, 1.0),
                   "z": ("z", 2, 1 / 2)}
    assert [r["time_s"] is None for r in res["results"].values()] == [True, True, True, True, False]
    assert res["average"]["greedy"] == pytest.approx((1 / 2 + 0 + 0 + 1 + 1 / 2) / 5)
    assert res["all"]["greedy"] == pytest.approx(4 / 8) and res["all"]["problems"] == 8
    assert res["files"]["z"]["repeats"] == [["z-001", "z-002"]] and res["files"]["x"]["repeats"] == []


# ---------------------------------------------------------------------------------------------------- resume


REAL_GENERATE = Generator.generate


class Counting:
    """Replaces Generator.generate: records every request (prompt, seed, temperature) and can fail on call N."""

    def __init__(self, monkeypatch, fail_on_call=None):
        self.calls, self.requests, self.fail_on_call = 0, [], fail_on_call

        def generate(gen, requests, progress=None):
            self.calls += 1
            if self.calls == self.fail_on_call:
                raise KeyboardInterrupt("simulated interruption")
            self.requests += [(tuple(r.prompt_ids), r.seed, r.sampling.temperature) for r in requests]
            return REAL_GENERATE(gen, requests, progress)
        monkeypatch.setattr(Generator, "generate", generate)


def without_time(results: dict) -> dict:
    """The rows of results.json without their wall times."""
    rows = results["results"] | {"(average)": results["average"], "(all)": results["all"]}
    return {name: {k: v for k, v in r.items() if k != "time_s"} for name, r in rows.items()}


def samples_of(out: Path) -> list[dict]:
    """The records of samples.jsonl, in file order, without the sandbox's wall times."""
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for r in records:
        for call in r["tool_calls"]:
            call.pop("wall_time")
    return records


def test_resume_generates_only_missing_samples_and_matches_uninterrupted_run(tmp_path, ckpt, monkeypatch):
    data = small_set(tmp_path)
    argv = ["--model", str(ckpt), "--data", str(data), "--k", "3", "--chunk", "2", "--seed", "1", *FAST]
    full = Counting(monkeypatch)
    reference = ev.main(argv + ["--out", str(tmp_path / "full")])
    assert (full.calls, len(full.requests), len(set(full.requests))) == (3, 6 * 4, 6 * 4)

    first = Counting(monkeypatch, fail_on_call=3)  # two chunks of two problems finish, the third is interrupted
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv + ["--out", str(tmp_path / "resumed")])
    assert len((tmp_path / "resumed" / "samples.rank0.jsonl").read_text().splitlines()) == 4 * 4
    second = Counting(monkeypatch)
    resumed = ev.main(argv + ["--out", str(tmp_path / "resumed")])
    assert (second.calls, len(second.requests)) == (1, 2 * 4)  # only the last chunk is generated
    assert not set(first.requests) & set(second.requests)
    assert sorted(first.requests + second.requests) == sorted(full.requests)
    assert without_time(resumed) == without_time(reference)
    assert samples_of(tmp_path / "resumed") == samples_of(tmp_path / "full")
    assert not list((tmp_path / "resumed").glob("samples.rank*"))

    more = Counting(monkeypatch)  # a larger k adds samples 3 and 4 of every problem, nothing else
    ev.main(argv + ["--k", "5", "--out", str(tmp_path / "full")])
    assert len(more.requests) == 6 * 2 and not set(more.requests) & set(full.requests)


def test_torn_last_line_is_regenerated_and_other_settings_refused(tmp_path, ckpt, monkeypatch):
    data = small_set(tmp_path, n=2)
    argv = ["--model", str(ckpt), "--data", str(data), "--k", "1", "--out", str(tmp_path / "out"), *FAST]
    ev.main(argv)
    samples = tmp_path / "out" / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # a write cut short
    again = Counting(monkeypatch)
    ev.main(argv)
    assert len(again.requests) == 1 and samples.read_text().splitlines() == lines
    with pytest.raises(ValueError, match="temperature: 0.6 there, 0.9 now.*another --out"):
        ev.main(argv + ["--temperature", "0.9"])


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_on_aime24(tmp_path, ckpt):
    data = shared_path("data", "aime24.jsonl")
    aime24 = load_problems(data)
    out = tmp_path / "out"
    cmd = [sys.executable, "eval.py", "--model", str(ckpt), "--data", "aime24", "--data-dir", str(data.parent),
           "--k", "2", "--max-new-tokens", "3", "--slots", "32", "--sandbox-workers", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"prompt of the first problem (torl):\n{torl_prompt(aime24[0].problem)}\n" in proc.stdout
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("source"))
    header, row = lines[start:start + 2]
    assert header.split() == ["source", "n", "greedy", "avg@2", "pass@2", "maj@2", "tool%", "ok%", "calls", "len",
                              "time_s"]
    assert row.split()[:2] == ["aime24", "30"]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["k"] == 2 and results["results"]["aime24"]["problems"] == 30
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 30 * 3 and {r["mode"] for r in records} == {"greedy", "sampled"}
    assert all(r["response_tokens"] <= 3 and r["answer"] for r in records)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, ckpt):
    data = small_set(tmp_path, n=7)  # chunks of 2 problems x 3 samples: the last one splits 1 / 2 over the ranks
    argv = ["--model", str(ckpt), "--data", str(data), "--k", "2", "--chunk", "2", *FAST]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py", *argv,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = ev.main(argv + ["--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert without_time(two) == without_time(one)
    assert samples_of(tmp_path / "two") == samples_of(tmp_path / "one")


def test_chat_template_prompts_and_is_part_of_the_settings(tmp_path, capsys):
    """--prompt-template chat with --template-vars on a Qwen3 instruct-style checkpoint: the first prompt is printed
    and recorded in the settings (samples made with another prompt are not mixed in); bad variables are refused."""
    ckpt = make_chat_checkpoint(tmp_path / "ckpt")
    data = small_set(tmp_path, n=2)
    argv = ["--model", str(ckpt), "--data", str(data), "--k", "1", "--out", str(tmp_path / "out"), *FAST,
            "--prompt-template", "chat", "--template-vars", '{"enable_thinking": false}']
    ev.main(argv)
    tok = Tokenizer(ckpt, "chat", {"enable_thinking": False})
    first = load_problems(data)[0].problem
    assert f"prompt of the first problem (chat):\n{tok.prompt(first)}\n" in capsys.readouterr().out
    assert tok.prompt(first).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert (settings["prompt_template"], settings["template_vars"]) == ("chat", {"enable_thinking": False})
    with pytest.raises(ValueError, match="other settings.*prompt_template: 'chat' there, 'torl' now"):
        ev.main(argv[:-4])
    with pytest.raises(SystemExit):
        ev.main(argv[:-1] + ["enable_thinking=false"])
    assert "--template-vars must be a JSON object" in capsys.readouterr().err


@needs_cxx
def test_compile_flag_decodes_through_the_compiled_forward_and_samples_the_same(tmp_path, ckpt, monkeypatch):
    """--compile: the decoding rows go through nanotorl.compiled_decode; the samples (greedy and sampled) are the
    ones the eager forward gives."""
    calls = []
    compiled_call = CompiledDecode.__call__
    monkeypatch.setattr(CompiledDecode, "__call__", lambda self, *a: calls.append(1) or compiled_call(self, *a))
    argv = ["--model", str(ckpt), "--data", str(small_set(tmp_path)), "--k", "2", "--temperature", "1.0", *FAST]
    ev.main(argv + ["--out", str(tmp_path / "eager")])
    assert not calls
    ev.main(argv + ["--out", str(tmp_path / "compiled"), "--compile"])
    assert calls
    kept = ("id", "mode", "index", "response", "finish_reason", "tool_calls")
    samples = [[{k: r.get(k) for k in kept} for r in read_records(tmp_path / out / "samples.jsonl")]
               for out in ("eager", "compiled")]
    assert len(samples[0]) == 6 * 3 and samples[0] == samples[1]  # per problem: greedy and k = 2 sampled
