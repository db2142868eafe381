"""nanotorl/dist.py around generation, and its sums of counts, on two CPU processes (gloo): see
tests/dist_generate.py for what runs."""
import json
import subprocess
import sys

import pytest

from test_train import ENV, REPO, torchrun


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    r = torchrun(2, "tests/dist_generate.py", str(tmp / "seen.json"), str(tmp / "tok"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "seen.json").read_text())


def test_gathered_restores_each_modules_resharding(seen):
    """After generation the root keeps its gathered weights after a forward (FSDP2's setting for it, so the
    backward does not gather the embedding again) and the blocks free theirs, as before any generation."""
    assert seen["resharded"] == [{"root": False, "blocks": True}] * 2


def test_generation_bypasses_fsdp_hooks_and_matches_the_unsharded_model(seen):
    """Generation runs without FSDP2's hooks, with the captured decode step (whose side streams a capture cannot
    join) and eagerly (where they add their launches to every step): no hook call in either; the step has no host
    sync, and both decode what the unsharded model decodes."""
    assert seen["steps"] >= 2 * 2  # two rollouts, each with decode steps (the first token follows the prefill)
    hooks = seen["fsdp_hooks"]
    assert hooks["graph"] == 0 and hooks["eager"] == 0 and hooks["outside"] > 0  # the spy sees other forwards
    assert seen["same"] and seen["logprob_diff"] < 1e-4


def test_counts_with_other_keys_on_each_rank_add_up(seen):
    """The error kinds of a step differ from rank to rank: dist.all_counts adds them up whatever each rank holds."""
    assert seen["counts"] == {"only on rank 0": 1, "only on rank 1": 2, "on both": 20}


ENDING = """
import atexit, sys
from pathlib import Path
from nanotorl import dist

out = Path(sys.argv[1])


class Finalised:
    def __del__(self):
        out.with_suffix(".finalised").write_text("yes")


kept = Finalised()  # a module global: its __del__ runs only in the interpreter's finalisation
atexit.register(lambda: out.with_suffix(".atexit").write_text("yes"))
if sys.argv[2] == "group":
    dist.setup()
    dist.teardown()
sys.stdout.write("x" * 100_000)  # buffered, not flushed yet
dist.end_process(3)
"""


@pytest.mark.parametrize("mode", ["group", "plain"])
def test_end_process_skips_finalisation_only_after_a_process_group(tmp_path, mode):
    """A process that joined a process group ends with os._exit: its atexit hooks ran, its output is whole, its
    status kept, and the interpreter's finalisation (where gloo's threads can abort the process) did not run; a
    plain process exits as usual."""
    script = tmp_path / "ending.py"
    script.write_text(ENDING)
    out = tmp_path / "out"
    args = (str(script), str(out), mode)
    r = torchrun(1, *args) if mode == "group" else subprocess.run([sys.executable, *args], cwd=REPO, env=ENV,
                                                                     capture_output=True, text=True, timeout=120)
    assert r.returncode == (1 if mode == "group" else 3), r.stderr[-2000:]  # torchrun reports a failed worker as 1
    if mode == "group":
        assert "exitcode  : 3" in r.stderr, r.stderr[-2000:]
    assert r.stdout.count("x") == 100_000
    assert out.with_suffix(".atexit").read_text() == "yes"
    assert out.with_suffix(".finalised").exists() == (mode == "plain")
