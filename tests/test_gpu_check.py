"""bench/gpu_check.sh without a GPU: its parts fit a device session and run in the order that keeps the most
results if time runs out, and each part's results reach $OUT before the next part starts (the parts run a
stand-in for python that logs its arguments and what $OUT holds when it starts, writes one result file, and
fails when told to); its first part, bench/deps.py, names what is missing."""
import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import bench.deps
from conftest import REPO

SESSION_S = 480  # what one device session can give the whole check
STUB = """#!/usr/bin/env bash
echo "$* | $(ls "$OUT" | tr '\\n' ' ')" >> "$STUB_LOG"
n=$(wc -l < "$STUB_LOG")
echo '{}' > "$BENCH_RESULTS/result_$n.json"
[ "$n" != "${STUB_FAIL:-}" ]
"""


def run_check(tmp_path, **env):
    """(the completed run, one line per stub call: 'arguments | files in $OUT', the $OUT folder)."""
    stub, out, results = tmp_path / "python", tmp_path / "out", tmp_path / "results"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out.mkdir()
    results.mkdir()
    (results / "earlier.json").write_text("{}")
    os.utime(results / "earlier.json", (0, 0))  # an earlier run's result: not this run's to copy
    env = dict(os.environ, PYTHON=str(stub), OUT=str(out), BENCH_RESULTS=str(results),
               STUB_LOG=str(tmp_path / "calls"), **env)
    run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    return run, (tmp_path / "calls").read_text().splitlines(), out


def test_parts_fit_a_device_session_in_the_right_order(tmp_path):
    run, calls, _ = run_check(tmp_path)
    assert run.returncode == 0 and "all parts passed" in run.stdout, run.stdout + run.stderr
    parts = re.findall(r"=== (.+) \(\S+, limit (\d+)s\)", run.stdout)
    assert len(parts) == len(calls) and sum(int(limit) for _, limit in parts) <= SESSION_S
    names = [name for name, _ in parts]
    assert names[:4] == ["dependencies", "bench.logprob", "bench.sampling", "bench.decode"]  # the kernels first
    assert calls[0].startswith("-m bench.deps --install bench/wheelhouse")
    assert dict(parts)["dependencies"] == "60"  # a cold import torch takes 5-15 s, an install more
    assert not [c for c in calls if "compiled" in c.split(" | ")[0]]  # torch.compile's minutes: not in a session
    pytest_args = next(c for c in calls if c.startswith("-m pytest")).split(" | ")[0].split()
    marked = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
              if re.search(r"^\s*@pytest\.mark\.gpu\b", p.read_text(), re.M)}
    assert {a for a in pytest_args if a.startswith("tests/")} == marked  # every file with GPU tests, only those


def test_each_parts_results_reach_out_before_the_next_part_starts(tmp_path):
    run, calls, out = run_check(tmp_path, STUB_FAIL="3")
    assert run.returncode == 1 and "failed: bench.sampling" in run.stdout
    for k, call in enumerate(calls, start=1):  # what $OUT held when part k started
        before = {f"result_{i}.json" for i in range(1, k)} | ({"gpu_check.log"} if k > 1 else set())
        assert set(call.split(" | ")[1].split()) == before, call
    assert {p.name for p in out.iterdir()} == {f"result_{i}.json" for i in range(1, len(calls) + 1)} | {
        "gpu_check.log"}
    assert "failed: bench.sampling" in (out / "gpu_check.log").read_text()


def test_dependency_check_names_what_is_missing(tmp_path, monkeypatch):
    """bench.deps, the check's first part: a package below the version asked for, one not installed and a module
    that does not import are each named (with what was found); what is there is not."""
    pytest_version = importlib.metadata.version("pytest")
    (tmp_path / "req.txt").write_text(f"pytest>=999  # too new\nnot-a-package\ntqdm\npytest<={pytest_version}\n")
    monkeypatch.setattr(bench.deps, "REQUIREMENTS", tmp_path / "req.txt")
    monkeypatch.setattr(bench.deps, "ENTRY_MODULES", ["bench.common", "not_a_module"])
    found = "\n".join(bench.deps.missing())
    assert f"package pytest>=999: {pytest_version} installed" in found
    assert "package not-a-package: not installed" in found
    assert "module not_a_module: No module named 'not_a_module'" in found
    assert "tqdm" not in found and "<=" not in found and "bench.common" not in found


def test_header_says_how_to_build_and_carry_the_wheelhouse():
    header = (REPO / "bench/gpu_check.sh").read_text().split("\nset -u")[0]
    assert "bash bench/wheelhouse.sh" in header and "carry" in header and ".gitignore" in header


def test_numpy_of_the_gpu_image_does_not_fail_the_check(monkeypatch):
    """numpy < 2.4 matters only to the CPU interpreter: a GPU machine with numpy 2.4 is not missing anything."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.4.1" if name == "numpy" else real(name))
    monkeypatch.setattr(bench.deps, "ENTRY_MODULES", [])
    assert not [line for line in bench.deps.missing() if "numpy" in line]


def fake_pip(monkeypatch, ok: bool, content: str):
    """bench.deps.install's pip: writes ``content`` into its --target folder, then succeeds or fails (a cut run)."""
    def run(cmd, check=False):
        target = Path(cmd[cmd.index("--target") + 1])
        (target / "pkg.py").write_text(content)
        return subprocess.CompletedProcess(cmd, 0 if ok else 1)

    monkeypatch.setattr(bench.deps.subprocess, "run", run)


def test_install_switches_to_a_fresh_folder_only_on_success(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_pip(monkeypatch, True, "first")
    assert bench.deps.install(tmp_path, site) and (site / "pkg.py").read_text() == "first"
    fake_pip(monkeypatch, False, "half")
    assert not bench.deps.install(tmp_path, site)
    assert (site / "pkg.py").read_text() == "first" and len(list(tmp_path.iterdir())) == 2  # site, its folder
    (tmp_path / "site-killed").mkdir()  # what an install killed by the time limit leaves
    fake_pip(monkeypatch, True, "second")
    assert bench.deps.install(tmp_path, site) and (site / "pkg.py").read_text() == "second"
    assert len(list(tmp_path.iterdir())) == 2  # the first install and the killed one's folder removed
