"""nanotorl installs beside the Hugging Face stack: the distribution claims only the import name ``nanotorl``, and the
package works from any directory, editable or from a wheel, with Hugging Face's ``kernels`` (which owns the top-level
name ``kernels``) and the newest transformers installed in the same environment; the scripts run from anywhere."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

INSTALLED_NAMES = {"nanotorl"}   # every top-level import name the wheel may install; nothing another project owns

# Run in a directory outside the repository: import every module of the installed nanotorl, then transformers and
# Hugging Face's kernels, then decode greedily with a random model and check the tokens against a full recompute.
OUTSIDE = r"""
import importlib, json, os, pkgutil, sys
import torch
import nanotorl
names = [m.name for m in pkgutil.walk_packages(nanotorl.__path__, "nanotorl.")]
for name in names:
    importlib.import_module(name)
import kernels, transformers
from transformers import Qwen2ForCausalLM  # noqa: F401  (needs Hugging Face's kernels since transformers 5.25)
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.tokenizer import Tokenizer
save_demo_tokenizer("tok")
tok = Tokenizer("tok")
cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
model = Qwen2(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)).eval()
prompt = tok.encode("What is 12 * 34?")
out = Generator(model, tok, slots=2, max_len=64, stop_ids=[]).generate(
    [Request(prompt, max_new_tokens=12, sampling=SamplingParams(temperature=0.0))])[0]
ids = list(prompt)
with torch.no_grad():
    for _ in range(12):
        ids.append(int(model.logits(model(torch.tensor([ids]))[0, -1]).argmax()))
print(json.dumps({"nanotorl": nanotorl.__file__, "kernels": kernels.__file__, "modules": len(names),
                  "greedy": out.response_ids, "recompute": ids[len(prompt):]}))
"""


def run_outside(tmp_path, env=None) -> dict:
    import json
    r = subprocess.run([sys.executable, "-c", OUTSIDE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel .`` builds from this checkout (no network: the build uses this environment)."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools: pip install -e '.[dev]'")
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "nanotorl"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))  # builds leave build/
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("nanotorl-*.whl")
    return path


def top_level_names(wheel_path: Path) -> set[str]:
    """The first component of every file the wheel installs (a top-level module's .py suffix dropped)."""
    names = set()
    for name in zipfile.ZipFile(wheel_path).namelist():
        first = name.split("/")[0]
        if not first.endswith((".dist-info", ".data")):
            names.add(first[:-3] if first.endswith(".py") and "/" not in name else first)
    return names


def test_the_wheel_installs_only_names_of_our_own(wheel):
    names = top_level_names(wheel)
    assert names == INSTALLED_NAMES, (f"the wheel installs top-level {sorted(names)}; only {sorted(INSTALLED_NAMES)} "
                                      f"may be (kernels is Hugging Face's, bench, train and eval are other projects'): "
                                      f"put new packages under nanotorl/")
    files = zipfile.ZipFile(wheel).namelist()
    assert "nanotorl/demo_base/model.safetensors" in files and "nanotorl/sandbox/server.py" in files


def test_the_top_level_name_check_catches_a_stray_package(tmp_path):
    """The check above reads names the way an installer writes them: a top-level package or module is caught."""
    stray = tmp_path / "stray.whl"
    with zipfile.ZipFile(stray, "w") as z:
        for name in ("nanotorl/__init__.py", "kernels/__init__.py", "train.py", "nanotorl-0.1.dist-info/RECORD"):
            z.writestr(name, "")
    assert top_level_names(stray) == {"nanotorl", "kernels", "train"}


def test_every_module_imports_and_decodes_outside_the_repository_beside_hf_kernels(tmp_path):
    pytest.importorskip("kernels", reason="Hugging Face's kernels is part of the dev extra: pip install -e '.[dev]'")
    got = run_outside(tmp_path)
    assert Path(got["nanotorl"]).resolve().is_relative_to(REPO / "nanotorl"), got   # the editable install
    assert "site-packages" in Path(got["kernels"]).parts, got                     # Hugging Face's own
    assert got["modules"] > 30 and got["greedy"] == got["recompute"], got


def test_a_wheel_install_works_outside_the_repository(tmp_path, wheel):
    pytest.importorskip("kernels", reason="Hugging Face's kernels is part of the dev extra: pip install -e '.[dev]'")
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    got = run_outside(work, env=dict(os.environ, PYTHONPATH=str(target)))
    assert Path(got["nanotorl"]).resolve().is_relative_to(target), got
    assert got["greedy"] == got["recompute"], got


@pytest.mark.slow
def test_torchrun_of_train_py_from_another_directory_writes_its_run_there(tmp_path):
    """``torchrun /abs/path/train.py`` from a run directory: the run lands in that directory, nothing in the repo."""
    before = set(p.name for p in REPO.iterdir())
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", str(REPO / "train.py"), "--steps", "2",
                        "--prompts-per-step", "4", "--eval-every", "0", "--save-every", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "step_000002" / "config.json").is_file()
    assert set(p.name for p in REPO.iterdir()) == before


def test_benchmarks_run_from_another_directory(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench"), "sandbox", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--workers" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(REPO / "bench"), "nosuch"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and "rollout" in r.stderr, r.stderr
