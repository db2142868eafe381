"""The trainer: data parallelism is exact, tool tokens get no gradient, a killed run resumes to the same
result, and the demo runs end to end."""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import REPO, ScriptedPolicy
from nanotorl.checkpoint import load_model
from nanotorl.cli import Stop
from nanotorl.config import InputsConfig, LogConfig, OptimConfig, RolloutConfig, TrainConfig
from nanotorl.data import Problem
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import ToolCall
from nanotorl.grpo import GRPOConfig, micro_batches, policy_loss, policy_sequence
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.tokenizer import Tokenizer

# One thread per process: multi-threaded CPU reductions (e.g. the embedding's backward) are not bitwise
# reproducible, and the resume test compares bits.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def torchrun(nproc, *args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def test_one_step_on_two_processes_equals_one_process(tmp_path):
    """Also with packed rows (several responses per row, nanotorl.grpo.packed_micro_batches) on two processes: the
    same weights as right-padded rows on one."""
    outs = {}
    for n, rows in ((1, "pad"), (2, "pad"), (2, "pack")):
        r = torchrun(n, "tests/dist_step.py", str(tmp_path / f"w{n}{rows}.pt"), rows)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n if rows == "pad" else rows] = torch.load(tmp_path / f"w{n}{rows}.pt")
    torch.manual_seed(0)
    init = Qwen2(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)).init_weights(std=0.2).state_dict()
    one, two = outs[1]["weights"], outs[2]["weights"]
    assert one.keys() == two.keys() == init.keys()
    assert max((one[k] - init[k]).abs().max() for k in one) > 1e-3  # the step really moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(outs["pack"]["weights"][k], one[k], atol=1e-6, rtol=1e-5, msg=f"packed {k}")
    assert outs[1]["stats"]["trained_tokens"] == outs[2]["stats"]["trained_tokens"] == outs["pack"]["stats"][
        "trained_tokens"]


def test_masked_tool_tokens_get_no_gradient():
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).init_weights(std=0.2)
    prompt, response, mask = [1, 2, 3], [5, 6, 7, 8, 9, 10], [1, 1, 0, 0, 1, 1]

    def grads(seq):
        model.zero_grad()
        mb = micro_batches([seq], 100)[0]
        logp = model.token_logprobs(mb["input_ids"], mb["targets"])
        loss, _ = policy_loss(logp, mb["old_logp"].flatten(), mb["advantage"].flatten(), mb["weight"].flatten(),
                              GRPOConfig(), normalizer=4)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    seq = policy_sequence(prompt, response, mask, [-1.0] * 6, 1.5)
    base = grads(seq)
    # what the tool tokens are predicted to be, and their old log-probs, must not matter
    other = dict(seq, targets=list(seq["targets"]), old_logp=list(seq["old_logp"]))
    for pos in (4, 5):  # positions 4 and 5 predict the response tokens 7 and 8, the tool output
        other["targets"][pos] = 30
        other["old_logp"][pos] = -9.0
    for a, b in zip(base, grads(other)):
        torch.testing.assert_close(a, b)
    assert any(g.abs().max() > 0 for g in base)
    # while changing a policy token's target does change the gradient
    policy = dict(seq, targets=list(seq["targets"]))
    policy["targets"][6] = 30
    assert any(not torch.allclose(a, b) for a, b in zip(base, grads(policy)))


# -------------------------------------------------------------------------------------------- validation

# held-out problem: (source, greedy right, greedy calls the tool, which of the 2 samples are right)
HELDOUT = {"p1": ("s1", True, False, "11"), "p2": ("s1", False, False, "01"), "p3": ("s2", False, True, "00"),
           "p4": ("s3", True, False, "10"), "p5": ("s3", True, False, "11"), "p6": ("s3", False, False, "00")}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


def validate(tok, eval_data: str, rank: int = 0, world: int = 1) -> dict:
    """train.evaluate with a scripted policy that answers as HELDOUT plans (eval_k = 2)."""
    def respond(text, sample):
        _, greedy, tool, right = HELDOUT[text]
        ok = greedy if sample is None else right[sample] == "1"
        calls = [ToolCall("print(1)", "ok", "1", 0.0)] if sample is None and tool else []
        return f"\\boxed{{{1 if ok else 2}}}", calls

    policy = ScriptedPolicy(tok, list(HELDOUT), respond)
    heldout = [Problem(text, text, "1", source) for text, (source, *_) in HELDOUT.items()]
    cfg = TrainConfig(inputs=InputsConfig(eval_data=eval_data), log=LogConfig(eval_k=2))
    return train.evaluate(torch.nn.Linear(1, 1), policy, heldout, cfg, rank, world, torch.device("cpu"), 0)[0]


def test_validation_per_source_and_their_mean_against_hand_count(tok):
    got = validate(tok, "heldout.jsonl")
    # by hand from HELDOUT: pass@1 = mean of c/2, pass@2 = any right
    expected = {"eval_accuracy": 3 / 6, "eval_tool_fraction": 1 / 6, "eval_pass@1": 3 / 6, "eval_pass@2": 4 / 6,
                "eval_accuracy/s1": 1 / 2, "eval_tool_fraction/s1": 0.0, "eval_pass@1/s1": 3 / 4, "eval_pass@2/s1": 1.0,
                "eval_accuracy/s2": 0.0, "eval_tool_fraction/s2": 1.0, "eval_pass@1/s2": 0.0, "eval_pass@2/s2": 0.0,
                "eval_accuracy/s3": 2 / 3, "eval_tool_fraction/s3": 0.0, "eval_pass@1/s3": 1 / 2,
                "eval_pass@2/s3": 2 / 3,
                "eval_accuracy/average": (1 / 2 + 0 + 2 / 3) / 3, "eval_tool_fraction/average": 1 / 3,
                "eval_pass@1/average": (3 / 4 + 0 + 1 / 2) / 3, "eval_pass@2/average": (1 + 0 + 2 / 3) / 3}
    assert got == pytest.approx(expected)
    # every rank sums the same keys, also a rank that holds no problem of a source (rank 1 holds only s3)
    assert validate(tok, "heldout.jsonl", 1, 2).keys() == validate(tok, "heldout.jsonl", 0, 2).keys() == expected.keys()
    # the demo's held-out arithmetic (no --eval-data) is one set, whatever its problems' sources
    assert validate(tok, "").keys() == {"eval_accuracy", "eval_tool_fraction", "eval_pass@1", "eval_pass@2"}


def test_held_out_repeats_dropped_before_the_limit_with_one_line(tmp_path, capsys):
    rows = [{"problem": f"What is {i} * 3?", "answer": str(3 * i), "source": s} for i, s in
            [(7, "s1"), (8, "s2"), (7, "s1"), (7, "s1"), (9, "s1"), (10, "s2")]]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = str(tmp_path / "heldout.jsonl")
    train_set, heldout = train.load_data(TrainConfig(inputs=InputsConfig(data=path, eval_data=path),
                                                     log=LogConfig(eval_problems=3)))
    assert len(train_set) == 6  # training problems may repeat: each is a draw
    assert [p.problem for p in heldout] == ["What is 7 * 3?", "What is 8 * 3?", "What is 9 * 3?"]
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'heldout.jsonl'}: 2 of 6 rows repeat 1 problems; each problem is evaluated and counted once"]


def long_and_short(tmp_path) -> str:
    """JSONL of 7 problems from sources alpha and beta: 3 of them with prompts of about 300 demo tokens."""
    long = "What is " + " + ".join(["1"] * 70) + "?"
    rows = [("What is 1 + 2?", "alpha"), (long, "alpha"), ("What is 2 + 2?", "alpha"), ("What is 3 + 2?", "alpha"),
            (long.replace("?", " + 2?"), "beta"), ("What is 4 + 2?", "beta"), (long.replace("?", " + 3?"), "beta")]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"problem": p, "answer": "1", "source": s}) + "\n" for p, s in rows))
    return str(path)


@pytest.mark.parametrize("mode", ["drop", "refuse"])
def test_prompts_past_the_models_positions_are_dropped_with_one_line_or_refused(tmp_path, capsys, mode):
    """The demo model has 512 positions: with 250 new tokens, a prompt over 262 tokens cannot be generated from."""
    path, tok = long_and_short(tmp_path), Tokenizer(train.BASE_DIR)
    cfg = TrainConfig(inputs=InputsConfig(data=path, eval_data=path, long_prompts=mode),
                      rollout=RolloutConfig(max_new_tokens=250))
    problems = train.load_data(cfg)[0]
    fit = [p for p in problems if len(tok.prompt_ids(p.problem)) + 250 <= 512]
    assert len(fit) == 4 and all(len(tok.prompt_ids(p.problem)) <= cfg.rollout.max_prompt_tokens for p in problems)
    line = (f"3 of 7 problems of {path} (alpha: 1, beta: 2) have a prompt that, with the 250 new tokens of the "
            f"budget, passes the model's 512 positions (max_position_embeddings; the longest prompt has "
            f"{max(len(tok.prompt_ids(p.problem)) for p in problems)} tokens)")
    if mode == "refuse":
        with pytest.raises(ValueError, match=re.escape(line + "; drop them with --long-prompts drop")):
            train.fitting_problems(cfg, tok, 512, rank=0)
        return
    train_set, heldout = train.fitting_problems(cfg, tok, 512, rank=0)
    assert train_set == heldout == fit
    assert capsys.readouterr().out.splitlines() == [f"dropped {line}; --long-prompts refuse stops instead"] * 2


# One generation slot: with several, which sequences share a forward depends on when sandbox results arrive,
# and batched matmuls round differently for different batch sizes (same tokens, different last bits).
DEMO_ARGS = ["--steps", "4", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "48",
             "--eval-every", "2", "--eval-problems", "8", "--eval-k", "2", "--save-every", "1", "--gen-slots", "1"]


def run_demo(out, *extra, wait_for=None):
    """train.py on the demo (committed base model); with ``wait_for``, SIGKILL it once that path exists."""
    cmd = [sys.executable, "train.py", "--out-dir", str(out), *DEMO_ARGS, *extra]
    if wait_for is None:
        r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not Path(wait_for).exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def metrics(out):
    drop = ("time_", "tokens_per_s", "memory_")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def kept_samples(out):
    """samples.jsonl's records, without the sandbox's wall times."""
    records = [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines()]
    for r in records:
        for call in r["tool_calls"]:
            del call["wall_time"]
    return records


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    run_demo(out)
    return out


def test_demo_runs_end_to_end(uninterrupted):
    rows = metrics(uninterrupted)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("reward", "accuracy", "tool_fraction", "calls_ok_fraction", "calls_per_response", "response_length",
                "entropy", "clip_fraction", "grad_norm", "logprob_gap_mean", "logprob_gap_max"):
        assert key in rows[1], key
    assert rows[1]["logprob_gap_max"] < 1e-3  # generator and trainer run the same model code
    raw = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    model_bytes = sum(t.nbytes for t in load_model(uninterrupted / "checkpoints" / "step_000004").state_dict().values())
    for row in raw[1:]:  # peak RSS per phase: above the weights + Adam's state, below what the machine has
        for phase in ("generate", "train") + (("save",) if row["step"] > 1 else ()):
            assert 3 * model_bytes / 1e9 < row[f"memory_{phase}_gb"] < 64, (row["step"], phase)
    assert {"eval_accuracy", "eval_pass@1", "eval_pass@2"} <= rows[2].keys()
    assert (uninterrupted / "curves.png").stat().st_size > 10_000
    ckpts = sorted((uninterrupted / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_000003", "step_000004"]  # keep_checkpoints=2
    load_model(ckpts[-1])


def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path):
    out = tmp_path / "run"
    run_demo(out, wait_for=out / "checkpoints" / "step_000002")
    assert not (out / "checkpoints" / "step_000004").exists()
    run_demo(out)
    assert metrics(out) == metrics(uninterrupted)
    assert kept_samples(out) == kept_samples(uninterrupted)  # what the killed run wrote after step 2 was dropped
    a = load_model(out / "checkpoints" / "step_000004").state_dict()
    b = load_model(uninterrupted / "checkpoints" / "step_000004").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_real_recipe_path_with_a_checkpoint_and_jsonl_data(tmp_path):
    """--model DIR --data FILE: a Hugging Face checkpoint and JSONL problems, with a malformed row skipped;
    --eval-data of two sources with a repeated problem: one line on the repeat, accuracies per source; packed rows,
    with the attention they take said at start-up."""
    from nanotorl.checkpoint import save_model
    from nanotorl.demo import demo_config, save_demo_tokenizer
    from nanotorl.tokenizer import Tokenizer
    save_demo_tokenizer(tmp_path / "ckpt")
    vocab = Tokenizer(tmp_path / "ckpt").vocab_size
    save_model(Qwen2(demo_config(vocab)).init_weights(), tmp_path / "ckpt", tokenizer_dir=tmp_path / "ckpt")
    rows = [json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:3] + ['{"problem": "no answer"}'] + rows[3:]) + "\n")
    heldout = [{"problem": f"What is {i} * 3?", "answer": str(3 * i), "source": s} for i, s in
               [(7, "s1"), (8, "s2"), (7, "s1"), (9, "s1")]]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in heldout))
    cmd = [sys.executable, "train.py", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "train.jsonl"),
           "--eval-data", str(tmp_path / "heldout.jsonl"), "--skip-bad-rows", "true", "--out-dir",
           str(tmp_path / "out"), "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
           "8", "--eval-problems", "3", "--eval-k", "1", "--gen-slots", "4", "--pack-rows", "true"]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 1 malformed rows" in r.stderr + r.stdout
    assert "training rows: responses packed into rows of up to 4096 tokens | attention for rows of 4096: " \
           "sdpa_varlen" in r.stderr + r.stdout
    assert "heldout.jsonl: 1 of 4 rows repeat 1 problems; each problem is evaluated" in r.stderr + r.stdout
    rows = metrics(tmp_path / "out")
    assert [row["step"] for row in rows] == [0, 1]
    assert {"eval_accuracy/s1", "eval_accuracy/s2", "eval_accuracy/average"} <= rows[0].keys()
    load_model(tmp_path / "out" / "checkpoints" / "step_000001")
    r = subprocess.run(cmd[:-2] + ["--skip-bad-rows", "false"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "train.jsonl:4" in r.stderr


def test_qwen3_with_its_chat_template_trains_and_saves_as_it_came(tmp_path):
    """--prompt-template chat --template-vars on a Qwen3 instruct-style checkpoint: the first prompt is printed, and
    the saved checkpoint is a Qwen3 with every end id and the chat template, prompted the same way again."""
    from conftest import make_chat_checkpoint
    from nanotorl.data import torl_user_message
    from nanotorl.tokenizer import Tokenizer
    base = make_chat_checkpoint(tmp_path / "base")
    rows = [json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "train.py", "--model", str(base), "--data", str(tmp_path / "train.jsonl"),
           "--prompt-template", "chat", "--template-vars", '{"enable_thinking": false}', "--out-dir",
           str(tmp_path / "out"), "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
           "8", "--eval-every", "0", "--gen-slots", "4"]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    prompt = f"<|im_start|>user\n{torl_user_message('What is 0 + 0?')}<|im_end|>\n<|im_start|>assistant\n" \
             "<think>\n\n</think>\n\n"
    assert f"prompt of the first problem (chat):\n{prompt}\n" in r.stdout
    saved = tmp_path / "out" / "checkpoints" / "step_000001"
    config = json.loads((saved / "config.json").read_text())
    assert (config["model_type"], config["head_dim"], config["eos_token_id"]) == ("qwen3", 12, Tokenizer(base).eos_ids)
    assert Tokenizer(saved, "chat", {"enable_thinking": False}).prompt("What is 0 + 0?") == prompt
    assert load_model(saved).cfg == load_model(base).cfg


# ------------------------------------------------------------------------------------------ tool health

# train.py with every sandbox server dying at its first run (as if the sandbox machine kept dying): the pool reports
# each lost run as an infrastructure failure and starts a new server. Nothing preloaded, so that restarts are quick.
DYING_SANDBOX = """
import functools, runpy, sys
from nanotorl import sandbox
sandbox.pool.SERVER_MAIN = ("import os, nanotorl.sandbox.server\\n"
                            "nanotorl.sandbox.server.Zygote.on_control = lambda *_: os._exit(137)\\n"
                            + sandbox.pool.SERVER_MAIN)
sandbox.SandboxPool = functools.partial(sandbox.pool.SandboxPool, preload=())
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_dying_sandbox_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["--out-dir", str(out), "--prompts-per-step", "4", "--group-size", "8", "--max-new-tokens", "48",
            "--eval-every", "0", "--save-every", "1", "--gen-slots", "8"]
    run_demo_steps = [sys.executable, "train.py", *args, "--steps", "1"]
    first = subprocess.run(run_demo_steps, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    r = subprocess.run([sys.executable, "-c", DYING_SANDBOX, *args, "--steps", "4"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    stopped = int(line.split()[2].rstrip(":"))  # "error: step N: the sandbox itself failed on ..."
    assert line.startswith(f"error: step {stopped}: the sandbox itself failed on "), line
    assert "above --tool-failure-limit 0.05" in line and "x 'SandboxError: the server died before this run" in line
    kept = out / "checkpoints" / f"step_{stopped - 1:06d}"
    assert f"the last checkpoint, {kept}, is intact" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(  # no partial checkpoint of the step
        f"step_{s:06d}" for s in range(max(1, stopped - 2), stopped))
    load_model(kept)
    assert [row["step"] for row in metrics(out)][-1] == stopped - 1


def health(calls, infra, limit):
    cfg = TrainConfig(rollout=RolloutConfig(tool_failure_limit=limit), log=LogConfig(out_dir="/nonexistent"))
    sums = {"calls": calls, "calls_infra_failed": infra}
    failures = {"infra/SandboxError: the server died": infra - 1, "infra/SandboxError: could not start": 1,
                "kind/SandboxError": infra}
    train.check_tool_health(sums, failures, 7, cfg)


def test_the_run_stops_only_above_the_tool_failure_limit():
    health(calls=100, infra=5, limit=0.05)   # 5% is not above 5%
    health(calls=0, infra=0, limit=0.0)      # no call, nothing failed
    health(calls=10, infra=10, limit=1.0)    # 1 never stops
    with pytest.raises(Stop, match=r"^step 7: the sandbox itself failed on 6 of 100 tool calls \(6.0%, above "
                                   r"--tool-failure-limit 0.05\): 5 x 'SandboxError: the server died'; 1 x "
                                   r"'SandboxError: could not start'\. .*no checkpoint was written yet"):
        health(calls=100, infra=6, limit=0.05)
    with pytest.raises(Stop, match="1 of 50 tool calls"):
        health(calls=50, infra=1, limit=0.0)


# ------------------------------------------------------------------------------------------ logging backends

RECORDS = [{"step": 1, "reward": 0.5, "tool_errors/NameError": 3, "calls_fixed_fraction": None},
           {"step": 2, "reward": 0.75, "tool_infra_failures": 1, "calls_fixed_fraction": 0.5}]


def test_tensorboard_gets_every_number_of_every_step(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard: the logging "
                                              "extra); --tensorboard true needs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with train.Log(TrainConfig(steps=2, log=LogConfig(out_dir=str(tmp_path), tensorboard=True)), 0, 0) as log:
        for record in RECORDS:
            log(record)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert got == {"step": [(1, 1.0), (2, 2.0)], "reward": [(1, 0.5), (2, 0.75)], "tool_errors/NameError": [(1, 3.0)],
                   "tool_infra_failures": [(2, 1.0)], "calls_fixed_fraction": [(2, 0.5)]}  # None is not a number


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline wandb run file: LevelDB-log blocks of 32 KiB after a 7-byte header, each
    record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a Record protobuf."""
    from wandb.proto import wandb_internal_pb2
    data, pos, rows, part = run_file.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block: padding
            pos += left
            continue
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_gets_every_record(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb: the logging extra); "
                                               "--wandb-project needs it")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    with train.Log(TrainConfig(steps=2, log=LogConfig(out_dir=str(tmp_path), wandb_project="nanotorl-test")), 0,
                   0) as log:
        for record in RECORDS:
            log(record)
    wandb.teardown()  # finish() returns before wandb's own process has written everything; this waits for it
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wandb_history(run_file)]
    assert rows == RECORDS


@pytest.mark.parametrize("options", [{}, {"aggregation": "constant", "dual_clip": 1.5, "mask_truncated": True,
                                          "filter_void_turns": True}])
@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_train_step_minimises_the_objective_of_its_options(options, pack):
    """train_step's loss (micro-batches of 40 tokens, padded or packed rows) is the objective of nanotorl/grpo.py
    computed one response at a time (test_grpo.brute_force_loss) on the trainer's own log-probs, budget and flags
    included."""
    from dist_step import global_batch
    from test_grpo import brute_force_loss
    optim = OptimConfig(micro_batch_tokens=40, lr=0.0, pack_rows=pack)
    cfg = TrainConfig(prompts_per_step=4, grpo=GRPOConfig(group_size=4, **options),
                      rollout=RolloutConfig(max_new_tokens=20), optim=optim)
    samples = global_batch(cfg)
    for i, s in enumerate(samples):
        s.truncated, s.void_turn = i % 5 == 1, i % 7 == 2
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).init_weights(std=0.2)

    def delta(i, t):  # ratios from e^-1.5 to e^1.5: both clips and the dual clip bind somewhere
        return ((i * 7 + t * 3) % 11 - 5) * 0.3

    for i, s in enumerate(samples):  # the generator's log-probs: the trainer's own minus delta
        ids = s.completion.prompt_ids + s.completion.response_ids
        with torch.no_grad():
            trainer = model.token_logprobs(torch.tensor([ids]), torch.tensor([ids[1:] + [-100]]))  # [len(ids)]
        P = len(s.completion.prompt_ids)  # position P - 1 + t predicts response token t
        s.completion.logprobs = [float(trainer[P - 1 + t]) - delta(i, t) for t in range(len(s.completion.logprobs))]
    stats = train.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), samples, cfg, torch.device("cpu"), 1)

    assert stats["loss"] == pytest.approx(brute_force_loss(samples, cfg.grpo, delta, 20), abs=1e-6, rel=1e-5)
    assert (stats["dual_clip_fraction"] > 0) == bool(options)
    assert stats["trained_sequences"] == sum(not ((options and s.truncated) or (options and s.void_turn))
                                             for s in samples)


def test_a_rerun_without_a_checkpoint_starts_its_metrics_afresh(tmp_path):
    """A run that never reached a checkpoint left lines behind: the next one starts from step 0 again and writes
    its own (before: one more step-0 line per rerun); a resumed run keeps the lines up to its checkpoint."""
    cfg = TrainConfig(log=LogConfig(out_dir=str(tmp_path)))
    for _ in range(3):
        with train.Log(cfg, 0, 0) as log:
            for step in range(3):
                log({"step": step, "reward": 0.5})
    steps = lambda: [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps() == [0, 1, 2]
    with train.Log(cfg, 0, 1) as log:
        log({"step": 2, "reward": 0.5})
    assert steps() == [0, 1, 2]
