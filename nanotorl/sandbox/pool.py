"""SandboxPool: run untrusted Python in confined children of a warm fork server.

    with SandboxPool(workers=4, wall_time=5.0) as pool:
        res = pool.run("print(2**100)")          # blocking -> Result
        fut = pool.submit("import sympy; ...")    # non-blocking -> concurrent.futures.Future[Result]

One server process (sandbox/server.py) per pool; one reader thread per server turns its messages
into Results and resolves futures. The pool never raises for anything the code does: every outcome
is a Result (sandbox/result.py), and ``Result.infra_error`` tells the sandbox's own failures from the
code's. If the server dies, sends what is not the protocol, or makes no progress for ``watchdog``
seconds while runs are outstanding (then we kill it), every outstanding run resolves as ``killed``
with ``infra_error`` and a new server is started. ``close()`` (or leaving the ``with`` block, or
interpreter exit) ends the server and every run; if the trainer dies outright, the server sees EOF on
its socket and does the same. What a pool of a process that was killed leaves (its working directory, and in the
mode without namespaces its pids cgroups) the next pool removes: sandbox/leftovers.py.
"""
import concurrent.futures
import itertools
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref

from nanotorl.sandbox import isolation, leftovers, protocol
from nanotorl.sandbox.result import Result, infra_failure, to_result

DEFAULT_PRELOAD = ("math", "fractions", "itertools", "numpy", "sympy")
# Run once in the server after the preload imports: sympy imports submodules and fills its caches on
# first use (a first factor() costs ~20 ms, the next ones ~0.5 ms); done here, every run inherits it.
SYMPY_WARMUP = """import sympy
x, y = sympy.symbols("x y")
sympy.factor(x**6 - 1), sympy.expand((x + y)**5), sympy.simplify(sympy.sin(x)**2 + sympy.cos(x)**2)
sympy.solve([x + y - 3, x - y - 1], [x, y]), sympy.solve(x**2 - 2, x), sympy.nsimplify(0.5)
sympy.integrate(x**2 * sympy.sin(x), x), sympy.diff(sympy.exp(x) * x, x), sympy.limit(sympy.sin(x) / x, x, 0)
sympy.Rational(1, 3) + sympy.sqrt(8), sympy.isprime(97), sympy.factorint(360), sympy.binomial(10, 3)
sympy.summation(x, (x, 1, 10)), sympy.Matrix([[1, 2], [3, 4]]).det(), sympy.N(sympy.pi, 30)
"""
START_TIMEOUT = 120.0  # seconds for a server to import its preload modules and answer
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds nanotorl/
SERVER_MAIN = "from nanotorl.sandbox.server import main; main()"  # what `python -c` runs; a pool keeps the one it saw


def check_hello(hello: dict) -> dict:
    """The server's first message: raise if it refused to start, warn loudly if it runs unconfined."""
    if "error" in hello:
        raise RuntimeError(hello["error"])
    info = hello["ready"]
    if not info["seccomp"]:
        warnings.warn(f"SandboxPool is running untrusted code WITHOUT seccomp ({info['problem']}): "
                      "allow_unconfined=True was passed. Do not do this outside a throwaway machine.",
                      RuntimeWarning, stacklevel=3)
    return info


class _Server:
    """One server process, its control socket and the futures of the runs sent to it."""

    def __init__(self, cfg: dict, workdir: str, main: str):
        ours, theirs = socket.socketpair()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
               "PYTHONIOENCODING": "utf-8:backslashreplace",
               "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", main,
                                      json.dumps(dict(cfg, fd=theirs.fileno()))],
                                     env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self.sock = ours
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.last_progress = time.monotonic()
        self.reader: threading.Thread | None = None
        try:
            hello = self.recv() if self.readable(START_TIMEOUT) else None
            if hello is None:
                raise RuntimeError(f"sandbox server did not start within {START_TIMEOUT:.0f} s "
                                   f"(exit code {self.proc.poll()}); its stderr above says why")
            self.info = check_hello(hello)
        except BaseException:
            self.stop()
            raise

    def readable(self, timeout: float) -> bool:
        poller = select.poll()  # not select.select: the trainer may hold more than 1024 descriptors
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def send(self, msg: dict) -> None:
        self.sock.sendall(protocol.encode(msg))

    def recv(self) -> dict | None:
        """One whole message, or None at EOF."""
        return protocol.read_frame(self.sock)

    def stop(self, grace: float = 5.0) -> None:
        """Close the socket (the server then kills its runs and exits), reap it; SIGKILL if it lingers."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def _clean_up(servers: dict, workdir: str) -> None:
    """Kill what is left (at interpreter exit, for a pool that was never closed), remove the workdir."""
    for proc, cgroup in list(servers.items()):
        proc.kill()
        proc.wait()
        isolation.remove_cgroup(cgroup, wait=1.0)
    try:
        os.rmdir(workdir)
    except OSError:
        pass


class SandboxPool:
    """A pool of confined Python runs (see the module docstring). Thread-safe.

    workers: runs executing at once; the others wait in the server's queue.
    wall_time, cpu_time: seconds; past either one the run is killed (status "timeout").
    memory_mb: address space a run may add to the warm server's own (RLIMIT_AS).
    max_output: bytes kept per stream; one more and the run is killed ("output_limit").
    preload: modules the server imports once, so that runs import them for free.
    warmup: code the server runs once after those imports (None: SYMPY_WARMUP when sympy is
        preloaded, else nothing).
    allow_unconfined: on a kernel that cannot seccomp, run anyway with a loud warning instead of
        refusing to start. Never the default.
    watchdog: seconds without any result, while runs are outstanding, after which the server is
        presumed stuck, killed and replaced (default ``2 * wall_time + 10``).
    """

    def __init__(self, workers: int = 4, wall_time: float = 5.0, cpu_time: float = 5.0, memory_mb: int = 1024,
                 max_output: int = 65536, preload: tuple[str, ...] = DEFAULT_PRELOAD, allow_unconfined: bool = False,
                 warmup: str | None = None, watchdog: float | None = None):
        watchdog = 2 * wall_time + 10.0 if watchdog is None else watchdog
        for name, value in (("workers", workers), ("wall_time", wall_time), ("cpu_time", cpu_time),
                            ("memory_mb", memory_mb), ("max_output", max_output), ("watchdog", watchdog)):
            if not value > 0:
                raise ValueError(f"SandboxPool: {name} must be positive, got {value!r}")
        if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
            raise TypeError(f"SandboxPool: preload must be a sequence of module names, got {preload!r}")
        self.cfg = {"workers": int(workers), "wall_time": float(wall_time), "cpu_time": float(cpu_time),
                    "memory_mb": int(memory_mb), "max_output": int(max_output), "preload": list(preload),
                    "allow_unconfined": bool(allow_unconfined),
                    "warmup": (SYMPY_WARMUP if "sympy" in preload else "") if warmup is None else warmup}
        self.watchdog = watchdog
        self._server_main = SERVER_MAIN
        leftovers.remove_dead()  # what pools of crashed processes left (sandbox/leftovers.py)
        self._workdir = tempfile.mkdtemp(prefix=leftovers.owner_prefix())
        os.chmod(self._workdir, 0o755)  # runs (another uid) may list it: it stays empty, they cannot write
        self._lock = threading.Lock()
        self._ids, self._starts = itertools.count(), itertools.count()
        self._closed = False
        self._procs: dict = {}  # live server processes -> their pids cgroup, for the exit-time finalizer
        self._finalizer = weakref.finalize(self, _clean_up, self._procs, self._workdir)
        try:
            self._server: _Server | None = self._start()
        except BaseException:
            self._closed = True
            self._finalizer()
            raise

    # -- public API ----------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        """What the current server reported: pid, namespaces, seccomp, arch, base_vm_mb."""
        with self._lock:
            server = self._ensure_server()
            return dict(server.info, server_pid=server.proc.pid)

    @property
    def server_pid(self) -> int:
        """Pid of the server process this pool started (killing it is how tests simulate a crash)."""
        return self.info["server_pid"]

    def submit(self, code: str) -> concurrent.futures.Future:
        """Queue ``code`` for a run; the future resolves to a Result (never to an exception)."""
        if not isinstance(code, str):
            raise TypeError(f"SandboxPool.submit: code must be str, got {type(code).__name__}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            try:
                server = self._ensure_server()
            except (RuntimeError, OSError) as e:
                if self._closed:
                    raise
                fut.set_result(infra_failure(f"could not start a server: {e}"))
                return fut
            rid = next(self._ids)
            if not server.pending:
                server.last_progress = time.monotonic()
            server.pending[rid] = fut
            try:
                server.send({"id": rid, "code": code})
            except OSError:  # the server just died; its reader resolves this future as killed
                pass
        return fut

    def run(self, code: str) -> Result:
        """Run ``code`` and wait for its Result."""
        return self.submit(code).result()

    def close(self) -> None:
        """End the server and every run (outstanding futures resolve as killed). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            try:
                server.sock.shutdown(socket.SHUT_RDWR)  # its reader sees EOF, fails what is left, reaps it
            except OSError:
                pass
            if threading.current_thread() is not server.reader:
                server.reader.join()
        self._finalizer()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- servers -------------------------------------------------------------------------------------
    def _ensure_server(self) -> _Server:
        """The live server, starting one if the last one died (caller holds the lock)."""
        if self._closed:
            raise RuntimeError("SandboxPool is closed: create a new pool (or keep using it inside its with block)")
        if self._server is None:
            self._server = self._start()
        return self._server

    def _start(self) -> _Server:
        name = f"{os.path.basename(self._workdir)}.{next(self._starts)}"  # a cgroup of its own per server
        cgroup = isolation.pids_cgroup_path(name)
        try:
            server = _Server(dict(self.cfg, cgroup_name=name), self._workdir, self._server_main)
        except BaseException:
            isolation.remove_cgroup(cgroup, wait=5.0)
            raise
        self._procs[server.proc] = cgroup
        server.reader = threading.Thread(target=self._read_loop, args=(server,), daemon=True,
                                         name=f"sandbox-reader-{server.proc.pid}")
        server.reader.start()
        return server

    def _read_loop(self, server: _Server) -> None:
        """Resolve futures from server messages until EOF; then fail what is left and restart."""
        cpu_limit, why = self.cfg["cpu_time"], "the server died before this run finished"
        while True:
            if not server.readable(1.0):
                if server.pending and time.monotonic() - server.last_progress > self.watchdog:
                    why = f"the server gave no result for {self.watchdog:g} s and was replaced"
                    server.proc.kill()  # stuck: no result for far longer than any run may take
                continue
            try:
                msg = server.recv()
                with self._lock:
                    fut = msg and server.pending.pop(msg.get("id"), None)
                if msg and fut is None:
                    raise protocol.ProtocolError(f"a result for run {msg.get('id')!r}, which is not outstanding")
                result = msg and to_result(msg, cpu_limit)
            except OSError:  # the connection broke: the server died (or the watchdog killed it)
                msg = None
            except (protocol.ProtocolError, KeyError, TypeError, AttributeError) as e:
                why = f"protocol error, the server was replaced ({e})"
                server.proc.kill()
                msg = None
            if msg is None:
                break
            server.last_progress = time.monotonic()
            fut.set_result(result)
        with self._lock:
            lost, server.pending = server.pending, {}
            if self._server is server:
                self._server = None
            if self._closed:
                why = "the pool was closed before this run finished"
        server.stop()
        isolation.remove_cgroup(self._procs.pop(server.proc), wait=5.0)
        for fut in lost.values():
            fut.set_result(infra_failure(why))
        with self._lock:  # restart now, so the next submit finds a warm server
            if not self._closed and self._server is None:
                try:
                    self._server = self._start()
                except (RuntimeError, OSError):  # the next submit tries again and reports why
                    pass
