"""nanotorl/cli.py: a user error (a missing or malformed file, a bad checkpoint, a bad flag value) ends train.py and
eval.py with one "error: ..." line that names the file and line, the tensor or the flag, and exit status 2, no
traceback; --debug shows the traceback. Each kind of error is tried on several members."""
import json
import subprocess
import sys

import pytest
import torch

import eval as evaluate
import train
from conftest import REPO
from nanotorl import cli
from nanotorl.checkpoint import save_model
from nanotorl.demo import BASE_DIR, demo_config, save_demo_tokenizer
from nanotorl.model import Qwen2
from nanotorl.tokenizer import Tokenizer

ROW = json.dumps({"problem": "What is 1 + 1?", "answer": "2"})


def one_error_line(capsys, main, argv) -> str:
    """Run ``main(argv)`` as the command does; check the status and that stderr is one line; return it."""
    status = cli.run(main, argv)
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (status, err)
    return err.strip()


def files(tmp_path) -> dict[str, list[str]]:
    """{case: train.py flags} for bad data files, each made in ``tmp_path``."""
    cases = {"missing": tmp_path / "missing.jsonl", "bad json": tmp_path / "bad.jsonl",
             "no answer": tmp_path / "noanswer.jsonl", "not utf-8": tmp_path / "latin1.jsonl",
             "not parquet": tmp_path / "fake.parquet"}
    cases["bad json"].write_text(f"{ROW}\n{ROW}\n{{\"problem\": \n")
    cases["no answer"].write_text(f"{ROW}\n{json.dumps({'problem': 'x'})}\n")
    cases["not utf-8"].write_bytes(ROW.encode() + b"\n" + '{"problem": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    cases["not parquet"].write_bytes(b"PAR1 this is not parquet")
    return {case: ["--data", str(path)] for case, path in cases.items()}


DATA_ERRORS = {"missing": "missing.jsonl", "bad json": "bad.jsonl:3: not valid JSON",
               "no answer": "noanswer.jsonl:2: missing field(s) ['answer']", "not utf-8": "latin1.jsonl:2: not UTF-8",
               "not parquet": "fake.parquet: not a readable parquet file"}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_bad_data_files_give_one_line_naming_file_and_line(tmp_path, capsys, case):
    argv = files(tmp_path)[case] + ["--out-dir", str(tmp_path / "out")]
    line = one_error_line(capsys, train.main, argv)
    assert DATA_ERRORS[case] in line, line
    if case in ("bad json", "no answer", "not utf-8"):
        assert line.endswith("pass --skip-bad-rows to skip malformed rows (and count them)")


def checkpoint(tmp_path, damage) -> str:
    """A demo-sized checkpoint with ``damage(directory)`` done to it."""
    path = tmp_path / "ckpt"
    save_demo_tokenizer(path)
    save_model(Qwen2(demo_config(Tokenizer(path).vocab_size)).init_weights(), path, tokenizer_dir=path)
    damage(path)
    return str(path)


def wrong_shape(path):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, path / "model.safetensors")


CHECKPOINT_ERRORS = {
    "no config": (lambda p: (p / "config.json").unlink(), "config.json not found"),
    "config not json": (lambda p: (p / "config.json").write_text("{\n  \"hidden_size\": 64,\n  oops\n}"),
                        "config.json:3:3: not valid JSON"),
    "weights not safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}"),
                                "model.safetensors: not a readable safetensors file"),
    "tensor of the wrong shape": (wrong_shape, "tensor model.norm.weight has shape [3]"),
    "tokenizer not json": (lambda p: (p / "tokenizer.json").write_text("{"), "tokenizer.json: not a tokenizers"),
}


@pytest.mark.parametrize("case", CHECKPOINT_ERRORS)
def test_bad_checkpoints_give_one_line_naming_the_file_or_tensor(tmp_path, capsys, case):
    damage, expected = CHECKPOINT_ERRORS[case]
    model = checkpoint(tmp_path, damage)
    assert expected in one_error_line(capsys, train.main, ["--model", model, "--out-dir", str(tmp_path / "out")])
    assert expected in one_error_line(capsys, evaluate.main, ["--model", model, "--out", str(tmp_path / "eval"),
                                                              "--max-new-tokens", "96"])  # fits the 512 positions


@pytest.mark.parametrize("main", [train.main, evaluate.main], ids=["train", "eval"])
def test_a_wrong_model_path_names_what_is_missing(tmp_path, capsys, main):
    out = ["--out-dir", str(tmp_path / "out")] if main is train.main else ["--out", str(tmp_path / "out")]
    line = one_error_line(capsys, main, ["--model", str(tmp_path / "nowhere")] + out)
    assert f"{tmp_path / 'nowhere'}: no such checkpoint directory" in line and "check --model" in line
    (tmp_path / "empty").mkdir()
    line = one_error_line(capsys, main, ["--model", str(tmp_path / "empty")] + out)
    assert f"{tmp_path / 'empty' / 'config.json'} not found" in line


def test_data_errors_come_before_the_weights_are_read(tmp_path, capsys):
    """A bad data file is named even when the weights are damaged too: the data is read (and its prompt lengths
    checked) before the model loads, which takes minutes at 7B."""
    model = checkpoint(tmp_path, CHECKPOINT_ERRORS["weights not safetensors"][0])
    line = one_error_line(capsys, train.main, files(tmp_path)["no answer"] + ["--model", model, "--out-dir",
                                                                             str(tmp_path / "out")])
    assert DATA_ERRORS["no answer"] in line
    long = "What is " + " + ".join(["1"] * 70) + "?"
    (tmp_path / "long.jsonl").write_text(f"{ROW}\n" + json.dumps({"problem": long, "answer": "70"}) + "\n")
    for main, out in ((train.main, "--out-dir"), (evaluate.main, "--out")):
        argv = ["--model", model, "--data", str(tmp_path / "long.jsonl"), "--max-new-tokens", "250", "--long-prompts",
                "refuse", out, str(tmp_path / "out")]
        line = one_error_line(capsys, main, argv)
        assert "1 of 2 problems of" in line and "(long: 1)" in line and "passes the model's 512 positions" in line


def test_a_damaged_training_checkpoint_names_its_file(tmp_path, capsys):
    ckpt = tmp_path / "out" / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).write_bytes((BASE_DIR / name).read_bytes())
    (ckpt / "trainer.pt").write_bytes(b"not a torch file")
    line = one_error_line(capsys, train.main, ["--out-dir", str(tmp_path / "out")])
    assert f"{ckpt / 'trainer.pt'}: cannot read the training state" in line and f"move {ckpt} away" in line


FLAG_ERRORS = {("--lr", "fast"): "argument --lr: invalid float value: 'fast'",
               ("--std-normalize", "maybe"): "argument --std-normalize: expected true or false, got 'maybe'",
               ("--aggregation", "mean"): "--aggregation must be 'token', 'sequence' or 'constant', got 'mean'",
               ("--dual-clip", "0.5"): "--dual-clip must be 0 (off) or a bound above 1",
               ("--tool-failure-limit", "1.5"): "--tool-failure-limit must be a fraction",
               ("--max-tool-calls", "-1"): "--max-tool-calls must be 0",
               ("--group-size", "1"): "--group-size must be at least 2 (a group of one has no spread",
               ("--steps", "-1"): "--steps must be at least 1, got -1",
               ("--prompts-per-step", "0"): "--prompts-per-step must be at least 1, got 0",
               ("--lr", "-1"): "--lr must be at least 0, got -1.0",
               ("--preset", "huge"): "argument --preset: invalid choice: 'huge'",
               ("--no-such-flag", "1"): "unrecognized arguments: --no-such-flag 1"}


@pytest.mark.parametrize("flag", FLAG_ERRORS, ids=lambda f: " ".join(f))
def test_bad_flag_values_give_one_line_naming_the_flag(capsys, flag):
    try:
        status = cli.run(train.main, list(flag))
    except SystemExit as e:  # argparse's own refusals exit from the parser, with status 2
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert FLAG_ERRORS[flag] in err


def test_eval_names_the_dataset_and_the_bad_value(tmp_path, capsys):
    line = one_error_line(capsys, evaluate.main, ["--model", str(BASE_DIR), "--data", "nosuchset", "--data-dir",
                                                  str(tmp_path)])
    assert "dataset 'nosuchset' is not a file" in line
    (tmp_path / "bad.jsonl").write_text(f"{ROW}\n[1, 2]\n")
    line = one_error_line(capsys, evaluate.main, ["--model", str(BASE_DIR), "--data", str(tmp_path / "bad.jsonl")])
    assert "bad.jsonl:2: expected a JSON object" in line and "pass --skip-bad-rows" in line
    with pytest.raises(SystemExit) as stop:
        cli.run(evaluate.main, ["--k", "0"])
    assert stop.value.code == 2 and capsys.readouterr().err == "error: --k must be at least 1, got 0 (see --help)\n"


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_the_commands_exit_2_with_one_line_and_debug_shows_the_traceback(tmp_path, script):
    # run where nothing else lives: a demo run in the repository (runs/demo) must not change the answer
    argv = [sys.executable, str(REPO / script), "--data", str(tmp_path / "missing.jsonl"), "--model", str(BASE_DIR)]
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert "missing.jsonl" in r.stderr.splitlines()[-1]
    r = subprocess.run(argv + ["--debug"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "missing.jsonl" in r.stderr


def test_sandbox_cli_names_the_file_it_cannot_read(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanotorl.sandbox", "-f", str(tmp_path / "nope.py")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path / 'nope.py'}: No such file or directory\n")


def test_debug_flag_is_read_before_the_parser_and_only_when_true():
    assert cli.wants_debug(["--debug"]) and cli.wants_debug(["--lr", "x", "--debug", "true"])
    assert not cli.wants_debug(["--debug", "false"]) and not cli.wants_debug(["--lr", "1"])
