"""SandboxPool: run untrusted Python in confined children of a warm fork server.

    with SandboxPool(workers=4, wall_time=5.0) as pool:
        res = pool.run("print(2**100)")          # blocking -> Result
        fut = pool.submit("import sympy; ...")    # non-blocking -> concurrent.futures.Future[Result]

One server process (sandbox/server.py) per pool; one I/O thread per server (sandbox/link.py) sends it
queued runs (a window of ``2 * workers + 2`` at a time), reads their output and the server's reports,
and resolves futures. ``submit`` only queues under a lock; no thread does I/O while holding it, and
every socket and pipe is polled, so no write waits on a reader that waits on it. The pool never
raises for anything the code does: every outcome is a Result (sandbox/result.py), and
``Result.infra_error`` tells the sandbox's own failures from the code's. If the server dies, sends
what is not the protocol, or makes no progress for ``watchdog`` seconds while runs are outstanding
(then we kill it), every run sent to it resolves as ``killed`` with ``infra_error``, and a new server
is started for the runs still queued. ``close()`` (or leaving the ``with`` block, or interpreter
exit) ends the server and every run; if the trainer dies outright, the server sees EOF on its socket
and does the same. What a pool of a process that was killed leaves (its working directory, and in
the mode without namespaces its pids cgroups) the next pool removes: sandbox/leftovers.py.
"""
import collections
import concurrent.futures
import itertools
import os
import select
import socket
import tempfile
import threading
import time
import weakref

from nanotorl.sandbox import isolation, leftovers, protocol
from nanotorl.sandbox.link import Link
from nanotorl.sandbox.result import Result, infra_failure

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
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds nanotorl/
SERVER_MAIN = "from nanotorl.sandbox.server import main; main()"  # what `python -c` runs; a pool keeps the one it saw


def server_env() -> dict:
    """The server's whole environment: nanotorl importable (PACKAGE_ROOT), one thread per math library."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
            "PYTHONIOENCODING": "utf-8:backslashreplace",
            "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}


def _drain(fd: int) -> None:
    """Read a non-blocking pipe empty."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _clean_up(servers: dict, workdir: str, fds: tuple) -> None:
    """Kill what is left (at interpreter exit, for a pool that was never closed), remove the workdir."""
    for proc, cgroup in list(servers.items()):
        proc.kill()
        proc.wait()
        isolation.remove_cgroup(cgroup, wait=1.0)
    try:
        os.rmdir(workdir)
    except OSError:
        pass
    for fd in fds:
        os.close(fd)


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
        self._lock = threading.Lock()  # guards _server, _queue and _closed; no thread does I/O while holding it
        self._queue: collections.deque = collections.deque()  # (id, code, future) not yet sent to a server
        self._window = 2 * int(workers) + 2  # runs sent to the server at once: workers running, as many ready
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # submit -> the I/O thread
        self._ids, self._starts = itertools.count(), itertools.count()
        self._closed = False
        self._procs: dict = {}  # live server processes -> their pids cgroup, for the exit-time finalizer
        self._finalizer = weakref.finalize(self, _clean_up, self._procs, self._workdir,
                                          (self._wake_r, self._wake_w))
        try:
            self._server: Link | None = self._start()
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
                self._ensure_server()
            except (RuntimeError, OSError) as e:
                if self._closed:
                    raise
                fut.set_result(infra_failure(f"could not start a server: {e}"))
                return fut
            self._queue.append((next(self._ids), code, fut))
        try:  # the server's I/O thread sends it
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # already woken
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
            queued, self._queue = self._queue, collections.deque()
        for _, _, fut in queued:
            fut.set_result(infra_failure("the pool was closed before this run was sent to a server"))
        if server is not None:
            try:
                server.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF, fails what is left, reaps it
            except OSError:
                pass
            if threading.current_thread() is not server.thread:
                server.thread.join()
        self._finalizer()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- servers -------------------------------------------------------------------------------------
    def _ensure_server(self) -> Link:
        """The live server, starting one if the last one died (caller holds the lock)."""
        if self._closed:
            raise RuntimeError("SandboxPool is closed: create a new pool (or keep using it inside its with block)")
        if self._server is None:
            self._server = self._start()
        return self._server

    def _start(self) -> Link:
        name = f"{os.path.basename(self._workdir)}.{next(self._starts)}"  # a cgroup of its own per server
        cgroup = isolation.pids_cgroup_path(name)
        try:
            server = Link(dict(self.cfg, cgroup_name=name), self._workdir, self._server_main, server_env(),
                          self._wake_r)
        except BaseException:
            isolation.remove_cgroup(cgroup, wait=5.0)
            raise
        self._procs[server.proc] = cgroup
        server.thread = threading.Thread(target=self._serve, args=(server,), daemon=True,
                                         name=f"sandbox-io-{server.proc.pid}")
        server.thread.start()
        return server

    def _serve(self, server: Link) -> None:
        """The server's I/O thread: send queued runs, read results and output, until the server ends."""
        why = "the server died before this run finished"
        try:
            while True:
                self._hand_over(server)
                server.flush()
                for fd, events in server.poller.poll(1000):
                    if fd == self._wake_r:
                        _drain(fd)
                    elif fd == server.sock.fileno():
                        if events & ~select.POLLOUT and not server.on_socket():
                            raise EOFError("the server closed its socket")
                    elif fd in server.by_stream:  # (closed already when an earlier event ended its run)
                        server.on_stream(fd)
                if server.pending and time.monotonic() - server.last_progress > self.watchdog:
                    why = f"the server gave no result for {self.watchdog:g} s and was replaced"
                    server.proc.kill()  # stuck: no result for far longer than any run may take
        except (EOFError, OSError):  # the server died (or the watchdog killed it)
            pass
        except (protocol.ProtocolError, KeyError, TypeError, AttributeError) as e:
            why = f"protocol error, the server was replaced ({e})"
            server.proc.kill()
        self._retire(server, why)

    def _hand_over(self, server: Link) -> None:
        """Send queued runs while fewer than the window are outstanding (the server holds their descriptors)."""
        while self._queue and len(server.pending) < self._window:  # (looked at without the lock: then it is sure)
            with self._lock:
                if not self._queue or self._server is not server:
                    return
                rid, code, fut = self._queue.popleft()
            server.send(rid, code, fut)

    def _retire(self, server: Link, why: str) -> None:
        """After a server ended: fail its runs, reap it, and start the next one for what is still queued."""
        with self._lock:
            if self._server is server:
                self._server = None
            if self._closed:
                why = "the pool was closed before this run finished"
        server.fail_all(why)
        server.stop()
        isolation.remove_cgroup(self._procs.pop(server.proc), wait=5.0)
        with self._lock:  # restart now, so the queue goes on and the next submit finds a warm server
            queued = collections.deque()
            if not self._closed and self._server is None:
                try:
                    self._server = self._start()
                except (RuntimeError, OSError) as e:  # the next submit tries again and reports why
                    queued, self._queue, why = self._queue, collections.deque(), f"could not start a server: {e}"
        for _, _, fut in queued:
            fut.set_result(infra_failure(why))
