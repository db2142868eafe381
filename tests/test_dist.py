"""nanotorl/dist.py around generation, and its sums of counts, on two CPU processes (gloo): see
tests/dist_generate.py for what runs."""
import json

import pytest

from test_train import torchrun


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
