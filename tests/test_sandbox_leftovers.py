"""sandbox/leftovers.py: a new pool removes the working directory and pids cgroups that a killed pool left, and
nothing else: not a live pool's, not another pid namespace's or uid's, not a name without an owner, not a
directory that is not empty, not a cgroup that still holds a task."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REFUSE_UNSHARE, REPO
from nanotorl.sandbox import SandboxPool, isolation, leftovers
from nanotorl.sandbox.leftovers import PREFIX, start_time


@pytest.fixture(scope="module")
def dead():
    """(pid, start time) of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = start_time(child.pid)
    child.kill()
    child.wait()
    return child.pid, start


def namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def names(dead) -> dict[str, bool]:
    """{entry name: should it be removed}."""
    pid, start = dead
    me = start_time(os.getpid())
    return {leftovers.owner_prefix() + "live": False,                         # this process: alive
            f"{PREFIX}{namespace()}-{pid}-{start}-gone": True,                 # its process ended
            f"{PREFIX}{namespace()}-{os.getpid()}-{me + 1}-reused": True,      # the pid now belongs to another process
            f"{PREFIX}{namespace() + 1}-{pid}-{start}-elsewhere": False,       # another pid namespace: cannot tell
            f"{PREFIX}abcd1234": False,                                        # no owner in the name
            "unrelated-dir": False}


def test_only_directories_of_dead_owners_are_removed(tmp_path, dead):
    for name in names(dead):
        (tmp_path / name).mkdir()
    full = tmp_path / f"{PREFIX}{namespace()}-{dead[0]}-{dead[1]}-full"       # not empty: rmdir only
    full.mkdir()
    (full / "file").write_text("x")
    file = tmp_path / f"{PREFIX}{namespace()}-{dead[0]}-{dead[1]}-file"       # not a directory
    file.write_text("x")
    gone = leftovers.remove_dead(str(tmp_path), cgroups=str(tmp_path / "no-cgroups"))
    assert sorted(gone) == sorted(str(tmp_path / n) for n, remove in names(dead).items() if remove)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, remove in names(dead).items() if not remove] + [full.name, file.name])


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory of another uid needs root")
def test_another_uids_directory_is_left_alone(tmp_path, dead):
    other = tmp_path / f"{PREFIX}{namespace()}-{dead[0]}-{dead[1]}-theirs"
    other.mkdir()
    os.chown(other, 54321, 54321)
    assert leftovers.remove_dead(str(tmp_path), cgroups=str(tmp_path / "no-cgroups")) == [] and other.is_dir()


def pids_parent() -> str:
    parent = isolation.pids_hierarchy()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable pids cgroup hierarchy here: the sandbox makes no cgroups to leave behind")
    return parent


def test_only_cgroups_of_dead_owners_without_tasks_are_removed(tmp_path, dead):
    parent = pids_parent()
    made = {name + ".0": remove for name, remove in names(dead).items() if name.startswith(PREFIX)}
    busy = f"{PREFIX}{namespace()}-{dead[0]}-{dead[1]}-busy.0"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in list(made) + [busy]:
            os.makedirs(os.path.join(parent, name, "0"))
        with open(os.path.join(parent, busy, "0", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))  # a task still in it: the cgroup stays
        gone = leftovers.remove_dead(str(tmp_path), cgroups=parent)
        assert sorted(gone) == sorted(os.path.join(parent, n) for n, remove in made.items() if remove)
        assert all(os.path.isdir(os.path.join(parent, n)) for n, remove in made.items() if not remove)
        assert os.path.isdir(os.path.join(parent, busy))
    finally:
        sleeper.kill()
        sleeper.wait()
        for name in list(made) + [busy]:
            isolation.remove_cgroup(os.path.join(parent, name), wait=5.0)


CRASHING = """
import sys, time
from nanotorl import sandbox
if sys.argv[1] == "no-namespaces":
    sandbox.pool.SERVER_MAIN = sys.argv[2] + sandbox.pool.SERVER_MAIN
pool = sandbox.pool.SandboxPool(workers=1, preload=())
print(pool._workdir, pool.info["cgroup"], pool.server_pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def own_tmp(monkeypatch):
    """A temporary directory of this test's own (traversable by the runs' uid, as /tmp is) that every pool of this
    process, and of the children given ``TMPDIR``, works in: another pool on the machine (a concurrent test run)
    would otherwise remove the killed pool's directory before the test's own pool could."""
    path = tempfile.mkdtemp(prefix="leftovers-test-")
    os.chmod(path, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["namespaces", "no-namespaces"])
def test_a_pool_started_after_a_killed_one_removes_what_it_left(mode, own_tmp):
    trainer = subprocess.Popen([sys.executable, "-c", CRASHING, mode, REFUSE_UNSHARE], cwd=REPO,
                               stdout=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=own_tmp))
    workdir, cgroup, server = trainer.stdout.readline().split()
    assert os.path.dirname(workdir) == own_tmp
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{server}") and time.monotonic() < deadline:  # the server sees EOF and ends
        time.sleep(0.01)
    # without namespaces its pids cgroup is left too (docs/sandbox.md), unless a pool of another process on the
    # machine removed it first: cgroups are the machine's, not a directory of the test's own
    left = [workdir] + ([cgroup] if cgroup != "None" and os.path.isdir(cgroup) else [])
    assert os.path.isdir(workdir)  # nothing ran to remove it
    with SandboxPool(workers=1, preload=()) as pool:
        assert pool.run("print(1)").stdout == "1\n"
        assert not any(os.path.exists(path) for path in left), left
