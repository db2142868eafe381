"""The attack classes of issue 11, each tried through the pool API (or the CLI) in both namespace modes.

Every test checks three things: the attack fails, the next innocent run still succeeds, and nothing
outside the run changed (the server, the spares, a concurrent innocent run, a host process, host files).
"""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from nanotorl.sandbox import isolation
from nanotorl.sandbox.result import neutralise, to_result
from nanotorl.sandbox.syscalls import NUMBERS

MODES = ["namespaces", "no-namespaces"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMN = os.uname().machine == "aarch64"
NR = {name: numbers[COLUMN] for name, numbers in NUMBERS.items()}


@pytest.fixture(scope="module", params=MODES)
def pool(request, sandbox_pool_factory):
    return sandbox_pool_factory(request.param, workers=2, wall_time=3.0, cpu_time=3.0, memory_mb=256,
                                max_output=4096, preload=("math", "numpy", "sympy"))


@pytest.fixture
def host():
    """What lies outside the runs: a host process, a world-readable host file in a world-searchable directory."""
    path = tempfile.mkdtemp(prefix="nanotorl-host-")
    os.chmod(path, 0o755)
    secret = os.path.join(path, "secret.txt")
    with open(secret, "w") as f:
        f.write("hunter2")
    os.chmod(secret, 0o644)
    victim = subprocess.Popen(["sleep", "60"])
    yield {"dir": path, "file": secret, "victim": victim}
    victim.kill()
    victim.wait()
    for name in os.listdir(path):
        os.remove(os.path.join(path, name))
    os.rmdir(path)


def zygote_and_children(pool) -> tuple[int, list[int]]:
    """The server process that forks runs, and its live children (its template, and spares when the pool is
    idle)."""
    outer = pool.server_pid
    kids = children(outer)
    zygote = kids[0] if "pid" in pool.info["namespaces"] else outer
    return zygote, children(zygote)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def innocent_and_outside_intact(pool, host, server, bystander=None):
    """The next run works, the server is the same, a host process lives, the host file is untouched."""
    res = pool.run("print(6 * 7)")
    assert (res.status, res.stdout) == ("ok", "42\n"), res
    assert pool.server_pid == server and alive(server)
    assert host["victim"].poll() is None, "a host process died"
    with open(host["file"]) as f:
        assert f.read() == "hunter2"
    assert os.listdir(host["dir"]) == ["secret.txt"]
    if bystander is not None:
        res = bystander.result(timeout=30)
        assert (res.status, res.stdout) == ("ok", "bystander done\n"), res


ATTEMPTS = """import ctypes, fcntl, os, signal, struct, termios
libc = ctypes.CDLL(None, use_errno=True)
NR = NUMBERS
r, w = os.pipe()
targets = [os.getppid(), VICTIM, -VICTIM, 1]
out = {}
def attempt(name, call):
    try:
        out[name] = ("allowed", call())
    except OSError as e:
        out[name] = e.errno
def sys_(name, *args):
    ret = libc.syscall(NR[name], *args)
    if ret == -1:
        raise OSError(ctypes.get_errno(), name)
    return ret
"""

SIGNAL_PATHS = ATTEMPTS + """
for t in targets:
    attempt(f"F_SETOWN {t}", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, t))
    attempt(f"F_SETOWN_EX {t}", lambda: fcntl.fcntl(r, 15, struct.pack("ii", 1, abs(t))))
attempt("F_SETSIG", lambda: fcntl.fcntl(r, 10, signal.SIGKILL))
attempt("O_ASYNC", lambda: fcntl.fcntl(w, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK))
attempt("FIOASYNC", lambda: fcntl.ioctl(w, termios.FIOASYNC, struct.pack("i", 1)))
attempt("F_NOTIFY", lambda: fcntl.fcntl(os.open(".", os.O_RDONLY), 1026, 0x80000001))
attempt("PR_SET_PDEATHSIG", lambda: sys_("prctl", 1, 9, 0, 0, 0))
attempt("PR_SET_PTRACER any", lambda: sys_("prctl", 0x59616D61, -1, 0, 0, 0))
attempt("mq_open", lambda: sys_("mq_open", b"q", os.O_CREAT | os.O_RDWR, 0o600, None))
attempt("mq_notify", lambda: sys_("mq_notify", 3, None))
sigevent = struct.pack("Qiii", 0, signal.SIGKILL, 4, os.getppid()).ljust(64, b"\\0")  # SIGEV_THREAD_ID
attempt("timer_create SIGEV_THREAD_ID", lambda: sys_("timer_create", 1, sigevent, ctypes.create_string_buffer(8)))
for t in targets + [-1]:
    attempt(f"kill {t}", lambda: os.kill(t, signal.SIGKILL))
attempt("tkill", lambda: sys_("tkill", os.getppid(), 9))
attempt("tgkill other", lambda: sys_("tgkill", os.getppid(), os.getppid(), 9))
attempt("ptrace attach", lambda: sys_("ptrace", 16, os.getppid(), 0, 0))
attempt("pidfd_open", lambda: sys_("pidfd_open", os.getppid(), 0))
attempt("process_vm_readv", lambda: sys_("process_vm_readv", os.getppid(), 0, 0, 0, 0, 0))
attempt("setpgid into the server's group", lambda: os.setpgid(0, os.getpgid(os.getppid())))
attempt("clone CLONE_PARENT|SIGKILL", lambda: sys_("clone", 0x8000 | 9, 0, 0, 0, 0))
os.write(w, b"x")  # what would send SIGIO had any owner been set
print(json.dumps(out))
"""


def test_no_run_can_make_the_kernel_signal_another_process(pool, host):
    server = pool.server_pid
    bystander = pool.submit("import time\ntime.sleep(1)\nprint('bystander done')")
    code = ("import json\n" + SIGNAL_PATHS).replace("NUMBERS", repr(NR)).replace("VICTIM", str(host["victim"].pid))
    res = pool.run(code)
    assert res.status == "ok", res
    allowed = {name: how for name, how in json.loads(res.stdout).items() if how != errno.EPERM}
    assert not allowed, f"these signal paths stayed open: {allowed}"
    innocent_and_outside_intact(pool, host, server, bystander)


def test_signals_from_outside_do_not_stop_the_server(pool, host):
    """A stray SIGINT/SIGHUP/SIGUSR1/SIGIO/real-time signal (as a run once sent with F_SETOWN) leaves it serving."""
    server = pool.server_pid
    zygote, _ = zygote_and_children(pool)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGIO, signal.SIGRTMIN + 3,
                signal.SIGTSTP, signal.SIGTTOU):
        for pid in {server, zygote}:
            os.kill(pid, sig)
    innocent_and_outside_intact(pool, host, server)
    with open(f"/proc/{zygote}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] != "T", "the server was stopped"


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_stopped_or_dead_spare_is_noticed_and_replaced(pool, host, sig):
    server = pool.server_pid
    pool.run("print('settle')")
    _, spares = zygote_and_children(pool)  # and the template: it is replaced as well
    assert spares, "no spare children to attack"
    for pid in spares:
        os.kill(pid, sig)
    results = [pool.submit(f"print({i})") for i in range(4)]
    assert [(r.result().status, r.result().stdout) for r in results] == [("ok", f"{i}\n") for i in range(4)]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in spares) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in spares), "the bad spares were not reaped"
    innocent_and_outside_intact(pool, host, server)


def started(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_runs_come_from_the_template_which_is_replaced_when_stopped_or_dead(pool, host, sig):
    """The template (sandbox/spawn.py) forks runs as the server's own children; one that is stopped or dies (no run can
    signal it: the server's uid, and the filter) is killed, reaped and replaced, and runs go on meanwhile."""
    if not pool.info["template"]:
        pytest.skip("no template on this machine: the server forks every run itself")
    server = pool.server_pid
    pool.run("print('settle')")
    zygote, kids = zygote_and_children(pool)
    template = min(kids, key=started)  # the spares come and go; it stays
    with open(f"/proc/{template}/status") as f:  # the server's own uid, not a run's
        assert f"\nUid:\t{os.getuid()}\t" in f.read()
    assert pool.run("import os\nprint(os.getppid())").stdout == f"{pool.info['pid']}\n"  # the server's child
    os.kill(template, sig)
    results = [pool.submit(f"print({i})") for i in range(6)]
    assert [(r.result().status, r.result().stdout) for r in results] == [("ok", f"{i}\n") for i in range(6)]
    deadline = time.monotonic() + 10
    while alive(template) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(template), "the stopped or dead template was not reaped"
    assert template not in zygote_and_children(pool)[1]
    assert pool.run("import os\nprint(os.getppid())").stdout == f"{pool.info['pid']}\n"  # from the new one
    innocent_and_outside_intact(pool, host, server)


def test_a_child_stopped_while_its_code_is_written_does_not_block_the_server(pool, host):
    server = pool.server_pid
    big = "x = 1\n" + "#" * (32 << 20) + "\nprint('big done')"  # 32 MiB: hundreds of pipe buffers
    fut = pool.submit(big)
    reader, deadline = None, time.monotonic() + 30
    while reader is None and time.monotonic() < deadline:  # the child that has read 1 MiB of it: stop it there
        for pid in zygote_and_children(pool)[1]:
            try:
                with open(f"/proc/{pid}/io") as f:
                    if int(f.read().split()[1]) > 1 << 20:  # rchar
                        reader = pid
            except OSError:
                pass
    assert reader is not None, "no child started reading the program"
    os.kill(reader, signal.SIGSTOP)
    res = pool.run("print('meanwhile')")  # a server blocked in write() would never get here
    assert (res.status, res.stdout, res.infra_error) == ("ok", "meanwhile\n", False), res
    assert not fut.result().infra_error, fut.result()  # timed out, then given to another child
    innocent_and_outside_intact(pool, host, server)


IDENTITY = """import os, json
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
out = {"ids": os.getresuid() + os.getresgid(), "groups": os.getgroups(), "nnp": status["NoNewPrivs"].strip(),
       "cap": status["CapEff"].strip()}
for name, path in (("private", PRIVATE), ("root", "/root")):
    try:
        out[name] = open(path).read() if name == "private" else os.listdir(path)
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"""


def test_runs_have_an_unprivileged_identity_of_their_own(pool, host):
    server = pool.server_pid
    private = os.path.join(host["dir"], "private.txt")
    with open(private, "w") as f:
        f.write("root only")
    os.chmod(private, 0o600)
    try:
        futures = [pool.submit(IDENTITY.replace("PRIVATE", repr(private))) for _ in range(2)]
        outs = [json.loads(f.result().stdout) for f in futures]
    finally:
        os.remove(private)
    for out in outs:
        ids = set(out["ids"])
        assert len(ids) == 1 and ids <= set(isolation.RUN_UIDS), out  # uid = gid, no root, no trainer uid
        assert (out["groups"], out["nnp"], out["cap"]) == ([], "1", "0000000000000000"), out
        assert out["private"] == errno.EACCES and out["root"] == errno.EACCES, out
    assert outs[0]["ids"] != outs[1]["ids"], "two concurrent runs shared a uid"
    innocent_and_outside_intact(pool, host, server)


TASK_BOMB = """import threading, time
threading.stack_size(64 << 10)  # small stacks: the memory limit alone would not stop them
n = 0
try:
    while n < 500:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        n += 1
except RuntimeError:
    pass
print(n, flush=True)
import os
os._exit(0)
"""


def test_a_thread_bomb_is_capped_per_run(pool, host):
    server = pool.server_pid
    bystander = pool.submit("import time\ntime.sleep(1)\nprint('bystander done')")
    res = pool.run(TASK_BOMB)
    assert res.status == "ok" and 0 < int(res.stdout) < isolation.TASKS, res
    if pool.info["cgroup"]:
        with open(os.path.join(pool.info["cgroup"], "0", "pids.max")) as f:
            assert f.read().strip() == str(isolation.TASKS)
    innocent_and_outside_intact(pool, host, server, bystander)


LOCKS = ATTEMPTS + """
fd = os.open(PATH, os.O_RDONLY)
attempt("flock LOCK_EX", lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))
attempt("flock LOCK_SH", lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))
attempt("F_SETLK read lock", lambda: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))
attempt("F_SETLKW read lock", lambda: fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hhqqi", 0, 0, 0, 0, 0)))
attempt("F_OFD_SETLK", lambda: fcntl.fcntl(fd, 37, struct.pack("hhqqi", 0, 0, 0, 0, 0)))
attempt("F_SETLEASE", lambda: fcntl.fcntl(fd, 1024, fcntl.F_RDLCK))
print(json.dumps(out))
"""


def test_runs_cannot_lock_host_files(pool, host):
    server = pool.server_pid
    code = ("import json\n" + LOCKS).replace("NUMBERS", repr(NR)).replace("VICTIM", str(host["victim"].pid))
    stdlib_os = "[p + '/os.py' for p in __import__('sys').path if os.path.exists(p + '/os.py')][0]"
    res = pool.run(code.replace("PATH", stdlib_os))  # a file a run may open (host files it may not read)
    assert res.status == "ok", res
    assert set(json.loads(res.stdout).values()) == {errno.EPERM}, res.stdout
    fd = os.open(os.__file__, os.O_RDWR)  # the host can lock it at once, both kinds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    innocent_and_outside_intact(pool, host, server)


RANDOMS = """import random, hashlib, sys, numpy, sympy
from sympy.core import random as sympy_random
found = {}  # every Random reachable from a loaded module (as an attribute or behind a bound method)
for module in list(sys.modules.values()):
    for value in list(vars(module).values()):
        for g in (value, getattr(value, "__self__", None)):
            if type(g) is random.Random:
                found[id(g)] = g
states = sorted(hashlib.sha1(repr(g.getstate()).encode()).hexdigest() for g in found.values())
print(repr([random.random(), numpy.random.rand(), sympy.randprime(1, 10**30), sympy_random.rng.random(), states]))
"""


def test_every_preloaded_random_generator_is_reseeded_per_run(pool, host):
    server = pool.server_pid
    first, second = (pool.run(RANDOMS) for _ in range(2))
    assert first.status == second.status == "ok", (first, second)
    a, b = (eval(r.stdout) for r in (first, second))
    assert all(x != y for x, y in zip(a[:4], b[:4])), (a, b)  # random, numpy, sympy's randprime, sympy's rng
    assert len(a[4]) >= 3 and not set(a[4]) & set(b[4]), (a[4], b[4])  # every Random instance, not just those
    innocent_and_outside_intact(pool, host, server)


def test_terminal_control_sequences_are_neutralised(pool, host):
    server = pool.server_pid
    nasty = "\x1b[2J\x1b]0;pwned\x07\x1b]52;c;aGk=\x07\x9b31m\r\x00\x7fok\tend"
    res = pool.run(f"import sys\nprint({nasty!r})\nprint({nasty!r}, file=sys.stderr)\nraise SystemExit({nasty!r})")
    shown = neutralise(nasty)
    assert shown == "\\x1b[2J\\x1b]0;pwned\\x07\\x1b]52;c;aGk=\\x07\\x9b31m\\x0d\\x00\\x7fok\tend"
    assert res.stdout == shown + "\n" and res.stderr == f"{shown}\n{shown}\n" and res.error_line == shown, res
    for text in (res.stdout, res.stderr, res.error_line):
        assert not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) <= 0x9F for c in text)
    out = subprocess.run([sys.executable, "-m", "nanotorl.sandbox", f"print({nasty!r})", "--preload", ""], cwd=REPO,
                         capture_output=True, timeout=120)
    assert not any(b < 32 and b not in b"\n" or b >= 0x7F for b in out.stdout), out.stdout
    innocent_and_outside_intact(pool, host, server)


def test_cli_takes_code_literally_and_reads_files_only_with_f(host, tmp_path):
    program = tmp_path / "answer.py"
    program.write_text("SECRET = 'hunter2'\nprint(SECRET)\n")
    program.chmod(0o600)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "nanotorl.sandbox", *args, "--preload", ""], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        return out.returncode, out.stdout + out.stderr

    for path in (str(program), host["file"]):  # an existing file, named as CODE, is code: a NameError or so
        rc, text = cli(path)
        assert rc == 1 and "hunter2" not in text, text
    rc, text = cli("-f", str(program))
    assert rc == 0 and json.loads(text)["stdout"] == "hunter2\n"


# -- infrastructure failures are told apart from the code's ---------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_server_that_never_answers_is_an_infrastructure_failure(mode, sandbox_pool_factory):
    pool = sandbox_pool_factory(mode, workers=1, wall_time=1.0, cpu_time=1.0, preload=(), watchdog=2.0)
    with pool:
        first = pool.server_pid
        zygote, _ = zygote_and_children(pool)
        for pid in {first, zygote}:
            os.kill(pid, signal.SIGSTOP)  # hung: alive, silent
        fut = pool.submit("print('never')")
        lost = fut.result(timeout=60)
        assert (lost.status, lost.infra_error) == ("killed", True) and "no result" in lost.stderr, lost
        res = pool.run("print(6 * 7)")
        assert (res.status, res.stdout, res.infra_error) == ("ok", "42\n", False) and pool.server_pid != first


def test_code_failures_are_not_infrastructure_failures(pool):
    for code in ("1/0", "import time\ntime.sleep(10)", "x = bytearray(10**11)", "import os\nos.fork()",
                 "print('x' * 10**6)", "import os\nos.abort()"):
        res = pool.run(code)
        assert res.status != "ok" and not res.infra_error, res
    never_started = {"id": 1, "stdout": b"", "stderr": b"sandbox: could not confine the run: OSError()\n",
                     "stdout_truncated": False, "stderr_truncated": False, "exit_code": 125, "signal": None,
                     "wall_time": 0.0, "cpu_time": 0.0, "reason": "not_started"}
    res = to_result(never_started, 1.0)
    assert (res.status, res.infra_error) == ("killed", True) and "could not confine" in res.stderr
