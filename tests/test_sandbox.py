"""Tests for sandbox/: the API contract, the attacks of issue 3 (each asserts the safe outcome, then that the
pool still serves the next run), in both namespace modes; the seccomp compiler against an independent BPF
interpreter and the table, the syscall numbers against libseccomp, the lifecycle, the protocol and the CLI.
The attacks of issue 11 are in tests/test_sandbox_attacks.py, the corpus in tests/test_sandbox_corpus.py."""
import collections
import ctypes
import ctypes.util
import errno
import json
import os
import platform
import signal
import socket
import struct
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from nanotorl.sandbox import SandboxPool, child, protocol
from nanotorl.sandbox.policy import (ALLOW, ERRNO, NEG_SELF, NUMBERS, POLICY, RUN, SELF, SERVER, When,
                                     combine, compile_policy)
SANDBOX_MODES = ["namespaces", "no-namespaces"]  # see sandbox_pool in tests/conftest.py

ARCH = platform.machine()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=SANDBOX_MODES)
def pool(request, sandbox_pool_factory):
    return sandbox_pool_factory(request.param, workers=4, wall_time=1.0, cpu_time=1.0, memory_mb=256,
                                max_output=4096, preload=("math", "numpy", "sympy"))


@pytest.fixture
def public_dir():
    """A directory anyone may write, holding a file anyone may write: only the sandbox stands in a run's way."""
    path = tempfile.mkdtemp(prefix="nanotorl-public-")
    os.chmod(path, 0o777)
    victim = os.path.join(path, "victim.txt")
    with open(victim, "w") as f:
        f.write("original")
    os.chmod(victim, 0o666)
    yield path
    shutil.rmtree(path)


def serves_next(pool):
    res = pool.run("print(6 * 7)")
    assert (res.status, res.stdout, res.exit_code) == ("ok", "42\n", 0), res


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc, independent of the sandbox's bookkeeping)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def steady_descendants(pid: int, want: int | None = None, wait: float = 10.0) -> int:
    """How many live processes are below ``pid`` once the count holds still (and is ``want``, if given), or after
    ``wait`` seconds: a server replaces a spare a moment after it hands one a run (its template forks it)."""
    deadline, last = time.monotonic() + wait, None
    while True:
        count = len(descendants(pid))
        if count == last and want in (None, count) or time.monotonic() > deadline:
            return count
        last = count
        time.sleep(0.1)


# -- the ordinary contract -------------------------------------------------------------------------------

def test_run_returns_stdout_and_exit_code(pool):
    res = pool.run("print(2**100)")
    assert (res.status, res.stdout, res.stderr, res.exit_code, res.signal) == ("ok", f"{2**100}\n", "", 0, None)
    assert res.error_line is None and not res.stdout_truncated and res.wall_time > 0 and res.cpu_time >= 0


def test_error_is_reported_like_python_c(pool):
    code = "y = 1\nx"
    ref = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    res = pool.run(code)
    assert (res.status, res.exit_code) == ("error", 1)
    assert res.error_line == "NameError: name 'x' is not defined"
    assert res.stderr == ref.stderr.replace('"<string>"', '"<code>"')


@pytest.mark.parametrize("code, exit_code, status", [("import sys\nsys.exit(3)", 3, "error"),
                                                     ("import sys\nsys.exit(0)", 0, "ok"),
                                                     ("raise SystemExit('bye')", 1, "error")])
def test_sys_exit_behaves_like_python_c(pool, code, exit_code, status):
    ref = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    res = pool.run(code)
    assert (res.status, res.exit_code, res.stderr) == (status, ref.returncode, ref.stderr)
    assert exit_code == ref.returncode
    serves_next(pool)


def test_syntax_error_and_nul_bytes_are_errors_not_exceptions(pool):
    assert pool.run("def (:").error_line.startswith("SyntaxError")
    assert pool.run("print(1)\x00").status == "error"
    serves_next(pool)


def test_input_without_stdin_gets_eof(pool):
    res = pool.run("input()")
    assert (res.status, res.error_line) == ("error", "EOFError: EOF when reading a line")
    serves_next(pool)


def test_runs_start_with_the_signal_state_of_python_c(pool):
    """The server blocks the signals that would stop it; a run gets a fresh mask and Python's own dispositions."""
    code = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('SigBlk', 'SigIgn'))])"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert pool.run(code).stdout == fresh


def test_preloaded_sympy_gives_the_same_answer_as_here(pool):
    import sympy
    x = sympy.Symbol("x")
    res = pool.run("import sympy\nx = sympy.Symbol('x')\nprint(sympy.integrate(x**2 * sympy.sin(x), x))")
    assert res.status == "ok" and res.stdout == f"{sympy.integrate(x**2 * sympy.sin(x), x)}\n"


def test_threads_and_numpy_work(pool):
    code = ("import threading, numpy as np\nout = []\n"
            "ts = [threading.Thread(target=lambda: out.append(float(np.ones((64, 64)) @ np.ones(64) @ np.ones(64))))"
            " for _ in range(4)]\n[t.start() for t in ts]\n[t.join() for t in ts]\nprint(out)")
    res = pool.run(code)
    assert (res.status, res.stdout) == ("ok", f"{[64.0 * 64] * 4}\n"), res


def test_submit_returns_before_the_run_ends(pool):
    fut = pool.submit("import time\ntime.sleep(0.3)\nprint('done')")
    assert not fut.done()
    assert fut.result(timeout=30).stdout == "done\n"


def test_concurrent_callers_get_their_own_results(pool):
    results = {}

    def caller(t):
        results[t] = [pool.run(f"print({t} * 100 + {i})").stdout for i in range(10)]

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == {t: [f"{t * 100 + i}\n" for i in range(10)] for t in range(8)}


def test_state_does_not_leak_between_runs(pool):
    first = pool.run("x = 41\nimport math, os, sys\nmath.pi = 3\nos.environ['LEAK'] = '1'\nsys.modules['evil'] = 1")
    assert first.status == "ok"
    res = pool.run("import math, os, sys\nprint(math.pi, os.environ.get('LEAK'), 'evil' in sys.modules)\nprint(x)")
    assert res.stdout == f"{3.141592653589793} None False\n"
    assert res.error_line == "NameError: name 'x' is not defined"


# -- processes ---------------------------------------------------------------------------------------

def test_fork_bomb_is_denied(pool):
    before = steady_descendants(os.getpid())  # the server, its template and its spare children
    res = pool.run("import os\nwhile True:\n    os.fork()")
    assert (res.status, res.error_line) == ("denied", "PermissionError: [Errno 1] Operation not permitted")
    assert steady_descendants(os.getpid(), want=before) == before
    serves_next(pool)


@pytest.mark.parametrize("code", ["import subprocess\nsubprocess.run(['echo', 'pwned'])",
                                  "import os\nos.execv('/bin/echo', ['echo', 'pwned'])",
                                  "import os\nos.posix_spawn('/bin/echo', ['echo', 'pwned'], {})"])
def test_starting_programs_is_denied(pool, code):
    res = pool.run(code)
    assert res.status == "denied" and "pwned" not in res.stdout, res
    serves_next(pool)


def test_os_system_runs_nothing(pool):
    res = pool.run("import os\nprint('rc', os.system('echo pwned'))")
    assert res.status == "ok" and "pwned" not in res.stdout and res.stdout != "rc 0\n", res
    serves_next(pool)


def test_killing_the_server_is_denied(pool):
    server = pool.server_pid
    res = pool.run("import os\nos.kill(os.getppid(), 9)")
    assert res.status == "denied"
    assert pool.server_pid == server
    serves_next(pool)


def test_killing_another_process_is_denied(pool):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        res = pool.run(f"import os\nos.kill({victim.pid}, 9)")
        assert res.status == "denied" and victim.poll() is None, res
    finally:
        victim.kill()
        victim.wait()
    serves_next(pool)


# -- time ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["while True:\n    pass",
                                  "import time\ntime.sleep(1e9)",
                                  "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1e9)",
                                  "import os, time\ntry:\n    os.setsid()\nexcept OSError:\n    pass\ntime.sleep(1e9)"],
                         ids=["busy-loop", "sleep", "sigterm-ignored", "setsid-then-sleep"])
def test_runs_that_never_end_are_killed(pool, code):
    res = pool.submit(code).result(timeout=60)
    assert res.status == "timeout" and res.signal in (signal.SIGKILL, signal.SIGXCPU), res
    assert res.wall_time >= 1.0 or res.cpu_time >= 0.95  # not before a limit (CPU is accounted in ticks)
    serves_next(pool)


# -- memory, output, recursion -------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["x = bytearray(10**11)",
                                  "import numpy as np\nxs = []\nwhile True:\n    xs.append(np.empty(10**7))"])
def test_memory_bombs_hit_the_limit(pool, code):
    res = pool.run(code)
    assert res.status == "memory" and res.error_line.split(":")[0].endswith("MemoryError"), res
    serves_next(pool)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_gigabyte_of_output_is_capped(pool, stream):
    res = pool.run(f"import sys\nchunk = 'x' * 10**6\nfor _ in range(1000):\n    sys.{stream}.write(chunk)")
    assert res.status == "output_limit" and res.signal == signal.SIGKILL
    assert getattr(res, stream) == "x" * 4096 and getattr(res, f"{stream}_truncated")
    serves_next(pool)


def test_binary_and_invalid_utf8_output(pool):
    raw = b"\xff\xfe ok \xc3"
    res = pool.run(f"import sys\nsys.stdout.buffer.write({raw!r})\nsys.stdout.flush()\nprint('\\udc80')")
    assert (res.status, res.stdout) == ("ok", (raw + b"\\udc80\n").decode("utf-8", "replace"))
    serves_next(pool)


def test_deep_recursion(pool):
    res = pool.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert (res.status, res.error_line) == ("error", "RecursionError: maximum recursion depth exceeded")
    res = pool.run("import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert res.status in ("error", "memory", "killed", "timeout"), res
    serves_next(pool)


# -- network, environment, files ------------------------------------------------------------------------

def test_network_is_unreachable(pool):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        res = pool.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('CONNECTED')")
        assert res.status == "denied" and "CONNECTED" not in res.stdout, res
        with pytest.raises(BlockingIOError):
            listener.accept()
    res = pool.run("import socket\nprint(socket.getaddrinfo('example.com', 80))")
    assert res.status in ("denied", "error") and res.stdout == "", res
    serves_next(pool)


def test_runs_see_a_minimal_environment(monkeypatch):
    monkeypatch.setenv("NANOTORL_TEST_SECRET", "hunter2")
    with SandboxPool(workers=1, preload=()) as small:
        res = small.run("import os\nprint(sorted(os.environ.items()))")
    assert res.status == "ok" and "hunter2" not in res.stdout
    assert {k for k, _ in eval(res.stdout)} <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR",
                                                "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"}


def test_trainer_environ_is_invisible_through_proc(pool):
    if "proc" not in pool.info["namespaces"] and os.getuid() != 0:
        pytest.skip("no pid namespace and not root: a same-uid run can read /proc/<trainer>/environ here")
    res = pool.run(f"print(open('/proc/{os.getpid()}/environ').read())")  # hidden (pid ns) or denied (caps)
    assert res.status in ("error", "denied") and res.stdout == "", res
    serves_next(pool)


@pytest.mark.parametrize("path", ["environ", "mem"])
def test_server_memory_and_environment_are_unreadable(pool, path):
    res = pool.run(f"import os\nprint(open(f'/proc/{{os.getppid()}}/{path}', 'rb').read(64))")
    assert (res.status, res.stdout) == ("denied", ""), res
    serves_next(pool)


WRITES = {
    "open-w": "open(P, 'w').write('pwned')", "open-a": "open(P, 'a').write('pwned')",
    "remove": "os.remove(P)", "rename": "os.rename(P, P + '.moved')", "chmod": "os.chmod(P, 0o777)",
    "chown": "os.chown(P, 1, 1)", "utime": "os.utime(P, (0, 0))", "truncate": "os.truncate(P, 0)",
    "symlink": "os.symlink(P, P + '.link')", "mkdir": "os.mkdir(P + '.dir')", "mkstemp": "tempfile.mkstemp()",
    "cwd-file": "open('here.txt', 'w')",
}


@pytest.mark.parametrize("op", WRITES)
def test_writes_fail_everywhere(pool, public_dir, op):
    victim = os.path.join(public_dir, "victim.txt")
    before = os.stat(victim)
    res = pool.run(f"import os, tempfile\nP = {victim!r}\n{WRITES[op]}")
    assert res.status == ("error" if op == "mkstemp" else "denied"), res  # mkstemp: "no usable temporary directory"
    after = os.stat(victim)
    assert open(victim).read() == "original" and os.listdir(public_dir) == ["victim.txt"]
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)
    serves_next(pool)


# -- the filter itself ---------------------------------------------------------------------------------

def test_raw_syscalls_through_ctypes_are_denied(pool):
    nr = {"x86_64": {"socket": 41, "clone": 56, "unshare": 272, "ptrace": 101, "seccomp": 317},
          "aarch64": {"socket": 198, "clone": 220, "unshare": 97, "ptrace": 117, "seccomp": 277}}[ARCH]
    calls = {"socket": (nr["socket"], 2, 1, 0), "fork via clone(SIGCHLD)": (nr["clone"], 17, 0, 0, 0, 0),
             "clone as the template does": (nr["clone"], child.SIBLING, 0, 0, 0, 0),
             "unshare(NEWNET)": (nr["unshare"], 0x40000000), "ptrace(TRACEME)": (nr["ptrace"], 0, 0, 0, 0),
             "seccomp(STRICT)": (nr["seccomp"], 0, 0, 0)}
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nout = {}\n"
            f"for name, args in {calls!r}.items():\n"
            "    out[name] = (libc.syscall(*args), ctypes.get_errno())\n"
            "prctls = {'drop filter': (22, 0), 'clear no_new_privs': (38, 0), 'drop pdeathsig': (1, 0)}\n"
            "for name, args in prctls.items():\n"
            "    out[name] = (libc.prctl(*args, 0, 0, 0), ctypes.get_errno())\n"
            "print(out)")
    res = pool.run(code)
    assert res.status == "ok", res
    assert eval(res.stdout) == {name: (-1, errno.EPERM) for name in list(calls) + ["drop filter", "clear no_new_privs",
                                                                                   "drop pdeathsig"]}
    serves_next(pool)


@pytest.mark.skipif(ARCH != "x86_64", reason="the x32 ABI exists only on x86_64")
def test_x32_abi_kills_the_run(pool):
    res = pool.run("import ctypes\nctypes.CDLL(None).syscall(0x40000000 + 39)\nprint('survived')")
    assert (res.status, res.signal, res.stdout) == ("denied", signal.SIGSYS, ""), res
    serves_next(pool)


# A reference classic-BPF interpreter (opcodes from linux/bpf_common.h), independent of the compiler.
AUDIT = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
KILL, ALLOW_RET, EPERM, ENOSYS = 0x80000000, 0x7FFF0000, 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS


def bpf(prog, arch_token, nr, *args):
    data = struct.pack("<iIQ6Q", nr, arch_token, 0, *(list(args) + [0] * (6 - len(args))))
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:                                   # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:                                 # BPF_ALU | BPF_AND | BPF_K
            acc &= k
        elif code in (0x15, 0x35, 0x45):                   # BPF_JMP | JEQ / JGE / JSET | BPF_K
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        elif code == 0x05:                                 # BPF_JMP | BPF_JA
            pc += k
        elif code == 0x06:                                 # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


ME = 4242


def table_allows(rule, args) -> bool:
    """The table's rule read directly (an independent reading of sandbox/policy.py, not the compiler's)."""
    if not isinstance(rule, When):
        return rule == ALLOW
    def holds(arg):
        v = args[arg.i]
        if arg.null:
            return v == 0
        lo = v & 0xFFFFFFFF
        if arg.one_of:
            return lo in [{SELF: ME, NEG_SELF: -ME & 0xFFFFFFFF}.get(x, x) for x in arg.one_of]
        return lo & arg.mask == arg.value
    return any(all(holds(a) for a in alternative) for alternative in rule.alternatives)


def probe_args(rule) -> list[list[int]]:
    """Argument vectors that sit on each side of every test in ``rule``, plus some noise."""
    vectors = [[0] * 6, [2**64 - 1] * 6, [ME, ME + 1, 1, 0, 0, 0], [-1 & (2**64 - 1), 9, 0, 0, 0, 0]]
    for alternative in getattr(rule, "alternatives", ()):
        for arg in alternative:
            values = [{SELF: ME, NEG_SELF: -ME & 0xFFFFFFFF}.get(x, x) for x in arg.one_of]
            values += [arg.value, arg.value | arg.mask, arg.value ^ (arg.mask & -arg.mask), 1 << 32]
            for v in values:
                for other in alternative:  # hold the others' values too, so the conjunction is reached
                    base = [0] * 6
                    if other is not arg and other.one_of:
                        base[other.i] = {SELF: ME, NEG_SELF: -ME & 0xFFFFFFFF}.get(other.one_of[0], other.one_of[0])
                    base[arg.i] = v
                    vectors.append(base)
    return vectors


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_compiled_policy_decides_like_the_table_says(arch):
    server, run = ([(c, jt, jf, {SELF: ME, NEG_SELF: -ME & 0xFFFFFFFF}.get(k, k)) for c, jt, jf, k in
                    compile_policy(s, arch)] for s in (SERVER, RUN))
    column = arch == "aarch64"

    def verdict(prog_list, nr, args):  # every program runs; the strictest answer wins, like the kernel's stack
        answers = [bpf(p, AUDIT[arch], nr, *args) for p in prog_list]
        return min(answers, key=lambda a: (a & 0xFFFF0000) ^ 0x80000000)

    read, i386 = (0, 63)[column], 0x40000003
    assert bpf(server, i386, read) == bpf(run, i386, read) == KILL
    if arch == "x86_64":
        assert bpf(server, AUDIT[arch], 0x40000000 + read) == KILL
    listed = set()
    for names, run_rule, server_rule in POLICY:
        for name in names.split():
            nr = NUMBERS[name][column]
            if nr is None:
                continue
            listed.add(nr)
            refused = 0x50000 | ERRNO.get(run_rule, errno.EPERM)
            for args in probe_args(run_rule):
                want = ALLOW_RET if table_allows(run_rule, args) else refused
                assert verdict([server, run], nr, args) == want, (name, args)
                both = combine(run_rule, server_rule)
                alone = ALLOW_RET if table_allows(both, args) else 0x50000 | ERRNO.get(both, errno.EPERM)
                assert verdict([server], nr, args) == alone, (name, args, "server program")
    for nr in set(range(500)) - listed:  # the allowlist: anything the table does not name is refused
        assert verdict([server, run], nr, [0] * 6) == EPERM, nr


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_policy_refuses_each_way_to_make_the_kernel_signal_or_lock_for_a_run(arch):
    """Named members of issue 11's classes, each against the compiled programs (the table test covers the rest)."""
    server, run = ([(c, jt, jf, {SELF: ME, NEG_SELF: -ME & 0xFFFFFFFF}.get(k, k)) for c, jt, jf, k in
                    compile_policy(s, arch)] for s in (SERVER, RUN))
    nr = {name: NUMBERS[name][arch == "aarch64"] for name in NUMBERS}

    def verdict(name, *args):
        answers = [bpf(p, AUDIT[arch], nr[name], *args) for p in (server, run)]
        return min(answers, key=lambda a: (a & 0xFFFF0000) ^ 0x80000000)

    F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLK, F_SETLKW, F_OFD_SETLK = 8, 10, 15, 6, 7, 37
    F_SETLEASE, F_NOTIFY, FIOASYNC, TIOCSTI, PR_SET_PDEATHSIG, PR_SET_PTRACER = 1024, 1026, 0x5452, 0x5412, 1, 0x59616D61
    for cmd in (F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLK, F_SETLKW, F_OFD_SETLK, F_SETLEASE, F_NOTIFY):
        assert verdict("fcntl", 3, cmd, ME) == EPERM, cmd
    assert verdict("fcntl", 3, 4, os.O_NONBLOCK) == ALLOW_RET and verdict("fcntl", 3, 4, os.O_ASYNC) == EPERM
    assert verdict("fcntl", 3, 4, os.O_ASYNC | os.O_NONBLOCK) == EPERM and verdict("fcntl", 3, 1) == ALLOW_RET
    assert verdict("ioctl", 3, FIOASYNC, 0) == verdict("ioctl", 0, TIOCSTI) == EPERM
    assert verdict("ioctl", 1, 0x5401) == ALLOW_RET  # TCGETS: isatty()
    assert verdict("prctl", PR_SET_PDEATHSIG, 9) == verdict("prctl", PR_SET_PTRACER, 2**64 - 1) == EPERM
    for name in ("mq_notify", "mq_open", "timer_create", "flock", "ptrace", "pidfd_open", "pidfd_send_signal",
                 "tkill", "socket", "socketpair", "setsid", "setpgid", "process_vm_writev", "wait4"):
        assert verdict(name, ME, 9) == EPERM, name
    assert verdict("kill", ME, 9) == verdict("kill", 0, 9) == verdict("kill", -ME & 0xFFFFFFFF, 9) == ALLOW_RET
    for pid in (ME + 1, 1, 2**32 - 1, -(ME + 1) & 0xFFFFFFFF):  # another pid, init, everyone, another group
        assert verdict("kill", pid, 9) == EPERM, pid
    assert verdict("tgkill", ME, ME + 1, 9) == ALLOW_RET and verdict("tgkill", 1, 1, 9) == EPERM
    assert verdict("clone", 0x3D0F00) == ALLOW_RET  # glibc's pthread_create flags
    for flags in (17, 0x3D0F00 | 0x8000, 0x3D0F00 | 0x2000, 0x3D0F00 | 0x10000000, 0x100 | 0x800 | 17):
        assert verdict("clone", flags) == EPERM, hex(flags)  # fork, CLONE_PARENT, CLONE_PTRACE, NEWUSER, no THREAD
    # the server's template forks runs as the server's children: its clone passes the SERVER program alone
    assert bpf(server, AUDIT[arch], nr["clone"], child.SIBLING) == ALLOW_RET
    assert verdict("clone", child.SIBLING) == EPERM  # and a run's does not
    assert verdict("clone3") == verdict("openat2") == ENOSYS


def test_syscall_numbers_match_libseccomp():
    path = ctypes.util.find_library("seccomp")
    if path is None:
        pytest.skip("libseccomp is not installed here: nothing independent to compare the table against")
    lib = ctypes.CDLL(path)
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    unknown = []
    for name, numbers in NUMBERS.items():
        for arch, ours in zip(("x86_64", "aarch64"), numbers, strict=True):
            theirs = lib.seccomp_syscall_resolve_name_arch(AUDIT[arch], name.encode())
            if theirs == -1:  # __NR_SCMP_ERROR: a syscall newer than this libseccomp
                unknown.append(name)
            else:  # other negative numbers are libseccomp's "not on this architecture"
                assert ours == (theirs if theirs >= 0 else None), (name, arch, ours, theirs)
    assert set(unknown) <= {"setxattrat", "removexattrat", "open_tree_attr", "file_setattr"}  # Linux 6.13+


def test_unknown_architecture_is_refused():
    with pytest.raises(RuntimeError, match="riscv64"):
        compile_policy(RUN, "riscv64")


# -- lifecycle -------------------------------------------------------------------------------------------

def test_thousand_runs_leak_no_processes_or_descriptors(pool):
    serves_next(pool)
    fds, procs = len(os.listdir("/proc/self/fd")), steady_descendants(os.getpid())
    futures = [pool.submit(f"print({i})") for i in range(1000)]
    assert [f.result().stdout for f in futures] == [f"{i}\n" for i in range(1000)]
    assert len(os.listdir("/proc/self/fd")) == fds and steady_descendants(os.getpid(), want=procs) == procs


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_dead_server_is_restarted_and_its_runs_report_killed():
    with SandboxPool(workers=2, wall_time=30.0, cpu_time=30.0, preload=()) as small:
        first, cgroup = small.server_pid, small.info["cgroup"]
        fut = small.submit("import time\ntime.sleep(60)")
        time.sleep(0.2)  # let the run start
        doomed = descendants(first) | {first}  # the server, the run, the spare children
        os.kill(first, signal.SIGKILL)
        lost = fut.result(timeout=30)
        assert (lost.status, lost.infra_error) == ("killed", True) and "server died" in lost.stderr, lost
        serves_next(small)
        assert small.server_pid != first
        assert not any(alive(p) for p in doomed)
        assert not (cgroup and os.path.exists(cgroup)), "the dead server's pids cgroup was left behind"


def test_close_ends_everything_and_later_runs_raise():
    small = SandboxPool(workers=1, wall_time=30.0, preload=())
    server, cgroup = small.server_pid, small.info["cgroup"]
    fut = small.submit("import time\ntime.sleep(60)")
    time.sleep(0.2)
    doomed = descendants(server) | {server}
    small.close()
    assert fut.result(timeout=30).status == "killed"
    assert not any(alive(p) for p in doomed)
    assert not (cgroup and os.path.exists(cgroup)), "the pool's pids cgroup was left behind"
    with pytest.raises(RuntimeError, match="closed"):
        small.run("print(1)")
    small.close()  # idempotent


# A shell that starts a job in the background without job control (as CI may) makes it ignore SIGINT, and Python
# then installs no KeyboardInterrupt handler: the trainer restores it, as an interactive Ctrl-C would find it.
TRAINER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from nanotorl.sandbox import SandboxPool, protocol
with SandboxPool(workers=1, wall_time=60.0, cpu_time=60.0, preload=()) as pool:
    fut = pool.submit("import time\\ntime.sleep(60)")
    print(pool.server_pid, "pid" in pool.info["namespaces"], pool.info["cgroup"], flush=True)
    fut.result()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["interrupted", "killed"])
def test_no_orphans_when_the_trainer_is_interrupted_or_killed(sig):
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    server, pidns, cgroup = trainer.stdout.readline().split()
    server, layers = int(server), 2 if pidns == "True" else 1  # (outer ->) zygote -> run
    deadline = time.monotonic() + 30
    while len(descendants(server)) < layers and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # let the sleeping run start
    doomed = descendants(server) | {server}  # the server, the run, the spare children
    assert len(doomed) >= layers + 1
    trainer.send_signal(sig)
    trainer.wait(timeout=30)
    while any(alive(p) for p in doomed) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(p) for p in doomed)
    while cgroup != "None" and os.path.exists(cgroup) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cgroup == "None" or not os.path.exists(cgroup), "the server's pids cgroup was left behind"


NO_SECCOMP = """
import ctypes, json, platform, warnings
from nanotorl.sandbox import SandboxPool, protocol
from nanotorl.sandbox.policy import SockFilter, SockFprog
prctl, seccomp = {"x86_64": (157, 317), "aarch64": (167, 277)}[platform.machine()]
einval, allow = 0x50000 | 22, 0x7FFF0000  # answer like a kernel built without seccomp
prog = (SockFilter * 8)((0x20, 0, 0, 0), (0x15, 0, 3, prctl), (0x20, 0, 0, 16), (0x15, 0, 3, 22),
                        (0x06, 0, 0, einval), (0x15, 0, 1, seccomp), (0x06, 0, 0, einval), (0x06, 0, 0, allow))
libc = ctypes.CDLL(None)
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(SockFprog(8, prog)), 0, 0) == 0
try:
    SandboxPool(workers=1, preload=())
    refused = ""
except RuntimeError as e:
    refused = str(e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with SandboxPool(workers=1, preload=(), allow_unconfined=True) as pool:
        out = {"refused": refused, "seccomp": pool.info["seccomp"], "stdout": pool.run("print(6 * 7)").stdout}
out["warning"] = " ".join(str(w.message) for w in caught)
print(json.dumps(out))
"""


def test_without_seccomp_the_pool_refuses_unless_told_and_then_warns():
    out = subprocess.run([sys.executable, "-c", NO_SECCOMP], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert "cannot confine" in res["refused"] and "allow_unconfined=True" in res["refused"]
    assert (res["seccomp"], res["stdout"]) == (False, "42\n") and "WITHOUT seccomp" in res["warning"]


# -- CLI -------------------------------------------------------------------------------------------------

def cli(*args, stdin=None):
    out = subprocess.run([sys.executable, "-m", "nanotorl.sandbox", *args], input=stdin, capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    return out.returncode, json.loads(out.stdout)


def test_cli_runs_code_files_and_stdin(tmp_path):
    rc, res = cli("print(2**100)")
    assert rc == 0 and res["status"] == "ok" and res["stdout"] == f"{2**100}\n"
    script = tmp_path / "s.py"
    script.write_text("import math\nprint(math.factorial(20))\n")
    assert cli("-f", str(script), "--preload", "math")[1]["stdout"] == f"{2432902008176640000}\n"
    rc, res = cli("-", "--preload", "", stdin="x")
    assert rc == 1 and res["error_line"] == "NameError: name 'x' is not defined"


# -- protocol --------------------------------------------------------------------------------------------

def test_protocol_messages_carry_descriptors_and_garbage_is_rejected():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        r, w = os.pipe()
        outbox = protocol.Outbox(ours)
        outbox.put({"id": 7}, (w,))
        outbox.put({"kill": 7})
        assert outbox.flush() and outbox.waiting == collections.deque()
        (msg, fds), (kill, none) = protocol.receive(theirs), protocol.receive(theirs)
        assert (msg, len(fds), kill, none) == ({"id": 7}, 1, {"kill": 7}, [])
        os.write(fds[0], b"through the descriptor")  # the one sent (the sender's copy was closed once sent)
        os.close(fds[0])
        assert os.read(r, 100) == b"through the descriptor" and os.read(r, 100) == b""
        os.close(r)
        for garbage in (b"\xff\xff\xff", protocol.encode([1, 2]), b"x" * (protocol.MAX_MESSAGE + 1)):
            ours.send(garbage)  # undecodable, not a dict, too long
            with pytest.raises(protocol.ProtocolError):
                protocol.receive(theirs)
        ours.shutdown(socket.SHUT_WR)
        assert protocol.receive(theirs) is None  # EOF
