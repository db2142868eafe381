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
from conftest import REPO, shared_path
from nanotorl.checkpoint import save_model
from nanotorl.config import TrainConfig
from nanotorl.data import Problem, arithmetic_problems
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Completion, Generator, ToolCall
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.rollout import score_completion
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


# --------------------------------------------------------------------------------------------------- metrics


def record(pid, mode, index, extracted, correct, tokens=10, calls=()):
    return {"dataset": "d", "id": pid, "mode": mode, "index": index, "extracted": extracted, "correct": correct,
            "response_tokens": tokens, "tool_calls": [{"status": s} for s in calls]}


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
    res = ev.summarize({ev.key(r): r for r in rows}, "d", problems, 4)
    # pass@k = 1 - C(4-c, k)/C(4, k): a (c=2): 1/2, 5/6, 1, 1; b (c=1): 1/4, 1/2, 3/4, 1
    expected = {"problems": 2, "greedy": 0.5, "avg@4": 3 / 8,
                "pass@1": 3 / 8, "pass@2": (5 / 6 + 1 / 2) / 2, "pass@3": (1 + 3 / 4) / 2, "pass@4": 1.0,
                "maj@1": 0.5, "maj@2": 0.5, "maj@3": 0.0, "maj@4": 0.5,
                "tool_fraction": 3 / 8, "calls_ok_fraction": 2 / 4, "calls_per_response": 4 / 8,
                "response_length": 45.0}
    assert res.pop("greedy_tools") == {"tool_fraction": 0.0, "calls_ok_fraction": None, "calls_per_response": 0.0,
                                       "response_length": 10.0}
    assert res == pytest.approx(expected)


def test_table_shows_powers_of_two_and_k():
    assert ev.table_ks(16) == [2, 4, 8, 16]
    assert ev.table_ks(12) == [2, 4, 8, 12]
    assert ev.table_ks(1) == []


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
    assert r["tool_calls"] == [{"code": "print(2)\n", "status": "ok", "observation": "\\boxed{9}", "wall_time": 0.01}]
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
    assert "problem x1 is repeated as x3" in capsys.readouterr().out
    assert res["dup"]["problems"] == 2 and res["dup"]["duplicates_dropped"] == 1
    ids = {json.loads(line)["id"] for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()}
    assert ids == {"x1", "x2"}


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
    assert list(res) == ["arithmetic-heldout"] and res["arithmetic-heldout"]["problems"] == len(heldout)
    assert "step_000002 on arithmetic-heldout" in capsys.readouterr().out
    ids = {json.loads(line)["id"] for line in Path("runs/eval/step_000002/samples.jsonl").read_text().splitlines()}
    assert ids == {p.id for p in heldout}


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
    return {name: {k: v for k, v in r.items() if k != "time_s"} for name, r in results.items()}


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
    out = tmp_path / "out"
    cmd = [sys.executable, "eval.py", "--model", str(ckpt), "--data", "aime24", "--data-dir", str(data.parent),
           "--k", "2", "--max-new-tokens", "3", "--slots", "32", "--sandbox-workers", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, row = proc.stdout.splitlines()[1:3]
    assert header.split() == ["dataset", "n", "greedy", "avg@2", "pass@2", "maj@2", "tool%", "ok%", "calls", "len",
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
    two = json.loads((tmp_path / "two" / "results.json").read_text())["results"]
    assert without_time(two) == without_time(one)
    assert samples_of(tmp_path / "two") == samples_of(tmp_path / "one")
