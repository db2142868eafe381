"""sandbox/child.fork, fork(2) without CPython's at-fork work, and child.fork_sibling, the template's raw
clone(CLONE_PARENT), against os.fork: the child each gives (for fork_sibling, a child of its caller's parent)
runs Python (threads, logging, json) as os.fork's does, and finds its own thread id where glibc keeps it;
single_threaded against threading's own count; the server forks its runs with them."""
import json
import subprocess
import sys

import pytest

from nanotorl.sandbox import child

FORK = r"""
import json, logging, os, sys, threading, time
from nanotorl.sandbox import child
logging.basicConfig(stream=sys.stderr)
r, w = os.pipe()
parent = os.getpid()
if sys.argv[1] == "sibling":  # a template forks the child as ours, tells us its pid, and leaves
    pid_r, pid_w = os.pipe()
    template = child.fork()
    if template == 0:
        pid = child.fork_sibling(child.tid_address())
        if pid:
            os.write(pid_w, pid.to_bytes(4, "little"))
            os._exit(0)
    else:
        os.waitpid(template, 0)
        pid = int.from_bytes(os.read(pid_r, 4), "little")
else:
    pid = (child.fork if sys.argv[1] == "raw" else os.fork)()
if pid == 0:
    os.close(r)
    seen = []
    t = threading.Thread(target=lambda: seen.append(threading.current_thread() is not threading.main_thread()))
    t.start()
    t.join()
    logging.getLogger("x").warning("from the child")
    clock = time.pthread_getcpuclockid(threading.get_ident())  # glibc names the thread by the id it keeps
    out = {"pid": os.getpid(), "ppid": os.getppid(), "main": threading.current_thread() is threading.main_thread(),
           "thread_ran": seen, "threads": threading.active_count(), "json": json.dumps({"a": [1, 2.5]}),
           "own_clock": time.clock_gettime(clock) > 0}
    os.write(w, json.dumps(out).encode())
    os._exit(7)
os.close(w)
got = json.loads(os.read(r, 1 << 16))
_, status = os.waitpid(pid, 0)
got["pid"], got["ppid"] = got["pid"] == pid, got["ppid"] == parent
print(json.dumps(dict(got, status=os.waitstatus_to_exitcode(status))))
"""

THREADS = r"""
import threading
from nanotorl.sandbox import child
stop = threading.Event()
before = (child.single_threaded(), threading.active_count() == 1)
t = threading.Thread(target=stop.wait)
t.start()
during = (child.single_threaded(), threading.active_count() == 1)
stop.set()
t.join()
print(before, during)
"""


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


TID_ADDRESS = pytest.mark.skipif(child.tid_address() is None, reason="the kernel does not say where glibc keeps "
                                 "a thread's id (PR_GET_TID_ADDRESS): no template, the server forks its runs itself")


@pytest.mark.parametrize("how", ["raw", pytest.param("sibling", marks=TID_ADDRESS)])
def test_raw_fork_and_fork_sibling_give_a_child_that_runs_python_like_os_fork(how):
    raw, ref = run(FORK, how), run(FORK, "os")
    assert raw.returncode == 0 and ref.returncode == 0, (raw.stderr, ref.stderr)
    assert json.loads(raw.stdout) == json.loads(ref.stdout) == {
        "pid": True, "ppid": True, "main": True, "thread_ran": [True], "threads": 1, "json": '{"a": [1, 2.5]}',
        "own_clock": True, "status": 7}
    assert raw.stderr == ref.stderr == "WARNING:x:from the child\n"


def test_single_threaded_agrees_with_threading():
    out = run(THREADS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(True, True) (False, False)"


@pytest.mark.parametrize("mode", ["namespaces", "no-namespaces"])
def test_server_forks_runs_with_raw_fork(sandbox_pool_factory, mode):
    pool = sandbox_pool_factory(mode, workers=2, preload=("math", "numpy", "sympy"))
    assert pool.info["raw_fork"] is True and pool.info["template"] is (child.tid_address() is not None)
    pids = {pool.run("import os\nprint(os.getpid())").stdout for _ in range(4)}
    assert len(pids) == 4, pids  # a fresh process per run


def test_a_preload_module_with_an_at_fork_hook_keeps_os_fork(sandbox_pool_factory):
    """A preloaded module that registers an after_in_child hook: the server keeps os.fork, so the hook runs in
    every run (independent check: the hook's mark is seen by the run's code)."""
    warmup = "import os, sys\nos.register_at_fork(after_in_child=lambda: setattr(sys, 'forked_mark', 42))"
    pool = sandbox_pool_factory("namespaces", workers=1, preload=("math",), warmup=warmup)
    assert pool.info["raw_fork"] is False
    assert pool.run("import sys\nprint(getattr(sys, 'forked_mark', None))").stdout == "42\n"
