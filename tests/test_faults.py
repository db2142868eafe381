"""What clusters do to a run (nanotorl/faults.py, nanotorl/checkpoint.py): a signal stops every rank at a safe point
with a checkpoint and the same command resumes to the same result; a full disk is one line and the last checkpoint
stays; a torn log line does not block a restart; a second job on an out-dir is refused; a diverging step updates
nothing and repeated ones stop the run before anything non-finite is saved."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import REPO
from nanotorl import faults
from nanotorl.checkpoint import load_model
from nanotorl.training_checkpoint import latest_checkpoint, resume, save_checkpoint
from nanotorl.cli import Stop, one_line
from nanotorl.config import LogConfig, OptimConfig, TrainConfig
from nanotorl.demo import save_demo_tokenizer
from nanotorl.grpo import GRPOConfig
from nanotorl.memory import PhasePeaks
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.tokenizer import Tokenizer
from test_train import ENV, metrics, torchrun

RUN = ["--steps", "3", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "32", "--eval-every", "0",
       "--gen-slots", "1"]  # one slot: the resumed run must repeat the uninterrupted one bit for bit (test_train)


def launch(nproc: int, out: Path, tmp: Path, *extra) -> subprocess.Popen:
    """train.py on the demo (torchrun with ``nproc`` processes, or plain python for 0), sandboxes under ``tmp``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else \
        [sys.executable]
    return subprocess.Popen([*cmd, "train.py", "--out-dir", str(out), *RUN, *extra], cwd=REPO,
                            env=ENV | {"TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(p: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        file = out / "metrics.jsonl"
        if file.exists() and any(json.loads(line)["step"] >= step for line in file.read_text().splitlines()):
            return
        time.sleep(0.02)
    p.kill()
    raise AssertionError(f"the run did not log step {step}: {p.communicate()[1][-3000:]}")


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The process of ``rank`` among torchrun's workers (its children), found by its RANK variable."""
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"torchrun {torchrun_pid} has no worker of rank {rank}")


def stopped_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(("stopped:", "error:"))]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ preemption


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    p = launch(2, tmp / "run", tmp)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return tmp / "run"


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_the_same_command_resumes(uninterrupted, tmp_path):
    out = tmp_path / "run"
    p = launch(2, out, tmp_path, "--save-every", "10")  # no checkpoint but the one the signal asks for, and the last
    wait_for_step(p, out, 1)
    os.kill(rank_pid(p.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the next safe point
    _, err = p.communicate(timeout=300)
    line = stopped_line(err)
    step = int(line.split()[4])  # "stopped: SIGTERM after step N of 3: ..."
    assert p.returncode != 0 and "exitcode  : 143" in err and "KeyboardInterrupt" not in err, err[-3000:]
    ckpt = out / "checkpoints" / f"step_{step:06d}"
    assert 1 <= step < 3 and line.startswith(f"stopped: SIGTERM after step {step} of 3: checkpoint {ckpt}; resume with "
                                             f"the same command: torchrun --nproc_per_node=2 train.py --out-dir {out} "
                                             f"--steps 3"), line
    assert latest_checkpoint(out) == ckpt
    assert not list(tmp_path.glob("nanotorl-sandbox-*")), "the sandbox's directory was left behind"
    p = launch(2, out, tmp_path, "--save-every", "10")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert metrics(out) == metrics(uninterrupted)
    a = load_model(out / "checkpoints" / "step_000003").state_dict()
    b = load_model(uninterrupted / "checkpoints" / "step_000003").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_stops_with_one_line_and_status_130(tmp_path):
    out = tmp_path / "run"
    p = launch(0, out, tmp_path, "--steps", "50", "--save-every", "100")
    wait_for_step(p, out, 1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    step = int(stopped_line(err).split()[4])
    assert stopped_line(err).endswith(f"resume with the same command: python train.py --out-dir {out} {' '.join(RUN)} "
                                      f"--steps 50 --save-every 100")
    assert latest_checkpoint(out) == out / "checkpoints" / f"step_{step:06d}"
    assert not list(tmp_path.glob("nanotorl-sandbox-*")), "the sandbox's directory was left behind"


def test_a_second_signal_stops_at_once_but_a_repeat_of_the_first_does_not(monkeypatch):
    now, kills = [100.0], []
    monkeypatch.setattr(faults.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    with faults.Preemption() as stop:
        assert stop.requested(torch.device("cpu")) is None
        signal.raise_signal(signal.SIGTERM)  # the real signal, to the real handler
        now[0] += faults.DUPLICATE_S / 2
        stop._handle(signal.SIGINT, None)     # e.g. torchrun forwarding a group-wide signal: the same request
        assert kills == [] and stop.requested(torch.device("cpu")) == signal.SIGTERM
        now[0] += faults.DUPLICATE_S
        stop._handle(signal.SIGINT, None)
        assert kills == [(os.getpid(), signal.SIGINT)]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the re-sent signal ends the process
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) is \
        signal.default_int_handler


@pytest.mark.parametrize("signalled", [False, True])
def test_a_signal_during_the_rollout_stops_the_step_before_its_update(monkeypatch, signalled):
    from dist_step import global_batch
    cfg = TrainConfig(prompts_per_step=4, grpo=GRPOConfig(group_size=4), optim=OptimConfig(micro_batch_tokens=40),
                      log=LogConfig(eval_every=0))

    def rollout(*args):
        if signalled:
            signal.raise_signal(signal.SIGTERM)
        return global_batch(cfg)

    monkeypatch.setattr(train, "rollout_step", rollout)
    model, _ = trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen, cpu = SimpleNamespace(stats={"tool_wait_s": 0.0}, tokenizer=None), torch.device("cpu")
    with faults.Preemption() as signals:
        record = train.one_step(model, torch.optim.SGD(model.parameters(), lr=1.0), gen, [], [], 0, cfg, signals,
                                PhasePeaks(cpu), 0, 1, cpu)
        assert signals.requested(cpu) == (signal.SIGTERM if signalled else None)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert (record is None, moved == []) == (signalled, signalled), (record, moved)


def test_the_stop_line_gives_the_command_that_resumes_on_rank_0_only(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    stop = faults.stopped(signal.SIGTERM, 7, 60, "out/checkpoints/step_000007", ["--out-dir", "my out"], 0, 16)
    assert (stop.prefix, stop.status) == ("stopped", 143)
    assert str(stop) == ("SIGTERM after step 7 of 60: checkpoint out/checkpoints/step_000007; resume with the same "
                         "command: torchrun --nnodes=2 --nproc_per_node=8 train.py --out-dir 'my out'")
    quiet = faults.stopped(signal.SIGINT, 0, 60, None, [], 3, 16)
    assert (str(quiet), quiet.status) == ("", 130)


# ------------------------------------------------------------------------------------------ the out-dir lock


def test_a_second_job_on_an_out_dir_is_refused_with_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with faults.lock_out_dir(out, 0):
        r = torchrun(2, "train.py", "--out-dir", str(out), *RUN)
    assert r.returncode != 0 and "exitcode  : 2 " in r.stderr, r.stderr[-3000:]  # torchrun ends the later rank
    line = stopped_line(r.stderr)
    assert line.startswith(f"error: {out} is in use by another run (host ") and f"pid {os.getpid()}, " in line, line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_lock_left_by_a_killed_job_does_not_block_the_next(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom nanotorl import faults\nwith faults."
                               f"lock_out_dir({str(tmp_path)!r}, 0):\n    print(1, flush=True)\n    time.sleep(600)"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "1\n"
    with pytest.raises(Stop, match=f"pid {holder.pid}, ") as refused:
        with faults.lock_out_dir(tmp_path, 0):
            pass
    assert refused.value.status == 2
    holder.kill()
    holder.wait()
    with faults.lock_out_dir(tmp_path, 0):
        assert f"pid {os.getpid()}, " in (tmp_path / "lock").read_text()


# ------------------------------------------------------------------------------------------ metrics.jsonl


def test_a_torn_last_log_line_is_dropped_with_one_line_and_one_elsewhere_is_named(tmp_path, capsys):
    file = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "reward": 0.5}) for s in (1, 2, 3)]
    file.write_text(rows[0] + "\n" + rows[1] + "\n" + '{"step": 3, "rew')
    train.Log(TrainConfig(steps=4, log=LogConfig(out_dir=str(tmp_path))), 0, 2).close()
    assert file.read_text() == rows[0] + "\n" + rows[1] + "\n"
    said = [line for line in capsys.readouterr().out.splitlines() if "metrics.jsonl" in line]
    assert said == [f"{file}:3: dropped a torn last line (16 characters: Unterminated string starting at), left by a "
                    f"run that stopped while writing it"]
    file.write_text(rows[0] + "\n" + '{"step": 2, "rew' + "\n" + rows[2] + "\n")
    with pytest.raises(ValueError, match=f"^{file}:2: not valid JSON \\(Unterminated string starting at\\); a log "
                                         f"line is torn before the last one: delete that line"):
        train.Log(TrainConfig(steps=4, log=LogConfig(out_dir=str(tmp_path))), 0, 3)


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


def trained(lr=1e-2):
    """A small model and an AdamW optimizer after one step (so the optimizer holds state)."""
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).init_weights(std=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.logits(model(torch.tensor([[1, 2, 3]]))).sum().backward()
    opt.step()
    return model, opt


def save(model, opt, tok, out, step):
    save_checkpoint(model, opt, tok, out, step, {}, keep=2, rank=0, world=1)


def test_a_checkpoint_is_never_written_with_a_non_finite_value(tmp_path, tok):
    model, opt = trained()
    save(model, opt, tok, tmp_path, 1)
    with torch.no_grad():
        model.norm.weight[3] = float("nan")
        model.layers[1].mlp.down_proj.weight[0, :2] = float("inf")
    with pytest.raises(Stop, match=r"^step_000002: 3 non-finite values in 2 tensors \(e\.g\. layers\.1\.mlp\.down_proj"
                                   r"\.weight \(2\), norm\.weight \(1\)\), so it was not written; the last checkpoint, "
                                   ".*step_000001, is intact"):
        save(model, opt, tok, tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    model, opt = trained()
    opt.state[model.norm.weight]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(Stop, match=r"^step_000002: 1 non-finite values in 1 tensors \(e\.g\. optimizer\.norm\.weight\."
                                   r"exp_avg_sq \(1\)\), so it was not written"):
        save(model, opt, tok, tmp_path, 2)


def test_a_save_removes_the_torn_saves_a_killed_run_left(tmp_path, tok):
    """A run killed while saving (kill -9, a node lost) leaves step_N.tmp, as large as a checkpoint; the next save
    of a resumed run, whatever its step, removes every torn one and keeps the complete checkpoints."""
    model, opt = trained()
    save(model, opt, tok, tmp_path, 1)
    root = tmp_path / "checkpoints"
    for step in (2, 7):
        torn = root / f"step_{step:06d}.tmp"
        (torn / "optimizer").mkdir(parents=True)
        (torn / "model.safetensors").write_bytes(b"x" * 4096)
    save(model, opt, tok, tmp_path, 3)
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000003"]
    assert latest_checkpoint(tmp_path) == root / "step_000003"


def test_every_checkpoint_file_and_directory_is_flushed_to_disk_around_the_rename(tmp_path, tok, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b)))
    save(*trained(), tok, tmp_path, 1)
    root, final = tmp_path / "checkpoints", tmp_path / "checkpoints" / "step_000001"
    rename = events.index(("replace", str(root / "step_000001.tmp"), str(final)))
    tmp = str(root / "step_000001.tmp")  # a file flushed as <name>.tmp, then renamed into place inside it, counts
    flushed = {path.removesuffix(".tmp") if path != tmp else path for kind, path, *_ in events[:rename]
               if kind == "fsync"}
    assert {str(root / "step_000001.tmp" / p.name) for p in final.iterdir()} | {str(root / "step_000001.tmp")} <= \
        flushed
    assert ("fsync", str(root)) in events[rename:]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of ``size`` bytes mounted under tmp_path (root only), unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        path = tmp_path / "disk"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"a full disk is simulated with a small tmpfs, which this user cannot mount "
                        f"({r.stderr.strip()}); run the tests as root to check it")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # lazy: a failed test may hold a file open


def test_a_full_disk_is_one_line_with_the_space_needed_and_the_last_checkpoint_stays(tmp_path, tok, small_disk):
    model, opt = trained()
    save(model, opt, tok, tmp_path / "probe", 1)
    size = sum(-(-f.stat().st_size // 4096) * 4096 + 4096 for f in (tmp_path / "probe").rglob("*"))  # in pages
    weights = sum(p.numel() * 4 for p in model.parameters())
    disk = small_disk(size + weights)  # room for one checkpoint, not for a second beside it
    save(model, opt, tok, disk, 1)
    with pytest.raises(Stop, match=rf"^{disk / 'checkpoints'}: no room for checkpoint step_000002 \(it needs about "
                                   rf"{3 * weights / 2**20:,.1f} MiB, 0\.\d MiB are free\); the last checkpoint, "
                                   rf"{disk / 'checkpoints' / 'step_000001'}, is intact\. Free some space"):
        save(model, opt, tok, disk, 2)
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step_000001"]
    shutil.rmtree(disk / "checkpoints" / "step_000001")
    save(model, opt, tok, disk, 2)  # with room again, it saves
    assert latest_checkpoint(disk) == disk / "checkpoints" / "step_000002"


def test_a_full_disk_while_logging_names_the_file_and_the_restart_keeps_every_whole_line(tmp_path, small_disk):
    disk = small_disk(4096)
    cfg = TrainConfig(steps=1000, log=LogConfig(out_dir=str(disk)))
    with pytest.raises(OSError) as full, train.Log(cfg, 0, 0) as log:
        for step in range(1, 1000):
            log({"step": step, "reward": 0.123456789, "note": "x" * 50})
    assert one_line(full.value) == f"{disk / 'metrics.jsonl'}: No space left on device"
    train.Log(cfg, 0, 1000).close()  # the restart (the disk is still full: it only removes)
    rows = [json.loads(line) for line in (disk / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > 10


# ------------------------------------------------------------------------------------------ divergence


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    r = torchrun(2, "tests/dist_step.py", str(tmp_path / "w.pt"), "nan1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(tmp_path / "w.pt")
    torch.manual_seed(0)
    init = Qwen2(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)).init_weights(std=0.2).state_dict()
    assert out["stats"]["skipped"] == 1
    assert all(torch.equal(out["weights"][k], init[k]) for k in init)  # not a NaN, not a step


def test_repeated_non_finite_steps_stop_the_run_before_anything_non_finite_is_saved(tmp_path):
    out = tmp_path / "run"
    p = launch(0, out, tmp_path, "--lr", "1e9", "--steps", "8", "--save-every", "1")
    said, err = p.communicate(timeout=600)
    assert p.returncode == 1 and "Traceback" not in err, err[-3000:]
    rows = metrics(out)
    first = next(r["step"] for r in rows if r["skipped"])  # lr 1e9: step 1 makes a model whose loss is NaN
    assert [r["skipped"] for r in rows] == [0] * (first - 1) + [1, 1, 1]
    assert [r["skipped_steps"] for r in rows][-3:] == [1, 2, 3]
    assert f"step    {first} | " in said and said.count("| update skipped: loss nan, grad norm nan") == 3, said
    assert stopped_line(err).startswith(f"error: step {first + 2}: the loss or the gradient norm was not finite on 3 "
                                        f"steps in a row (loss nan, grad norm nan; --max-skipped-steps 3)")
    for ckpt in (out / "checkpoints").iterdir():
        model = load_model(ckpt)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values()), ckpt
        optimizer = torch.optim.AdamW(model.parameters())
        resume(model, optimizer, ckpt, 0, 1)  # the optimizer's DCP shards, read back
        assert optimizer.state and not faults.nonfinite(optimizer.state_dict()["state"]), ckpt
