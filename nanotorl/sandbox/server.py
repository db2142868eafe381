"""The warm fork server: imports the heavy modules once, then forks one confined child per run.

``SandboxPool`` starts it as ``python -c "from nanotorl.sandbox.server import main; main()" CONFIG``, in its
own session, with a minimal environment and an empty working directory. Start-up, once per server:

    block every signal that would end or stop it (but SIGTERM, and SIGKILL/SIGSTOP, which cannot be)
    unshare(pid, mount, net, ipc [, user when not root])  where the kernel allows it (sandbox/isolation.py)
    fork -> the "zygote", pid 1 of the new pid namespace, mounts a fresh /proc: runs see no process
            outside the sandbox, and when the zygote dies the kernel kills every run with it.
            The outer process only waits (kill it and PR_SET_PDEATHSIG kills the zygote).
    import the preload modules, run the warm-up code, find every random generator, share the import
        directories by descriptor, gc.freeze(), huge pages, not dumpable (no run can read the server's
        or another run's memory through /proc), a minimal os.environ, a pids cgroup where available
    install the SERVER seccomp program (sandbox/policy.py); every run inherits it
    probe: one real run checks that both seccomp programs and the run's identity hold; refuse to serve
           if they do not, unless the pool was explicitly allowed to run unconfined

Then one single-threaded event loop (epoll) over the control socket and the children. The server
keeps ``workers`` spare children, forked and confined ahead of time and blocked reading their code
from stdin, so a run starts with one write (fork and confinement stay off its latency). Each child
holds a slot (its uid and pids cgroup) until it is reaped. A spare that dies is replaced at once (its
pidfd is watched), one that was stopped is killed when it is picked; a child that dies before its code
ran hands the code to another. Writes of code never block: what a full pipe does not take is written
when it drains, and a child that never reads meets its deadline. A run is watched through its stdout
pipe, its stderr pipe and its pidfd (readable when it exits; signals through it cannot hit a recycled
pid). At most ``workers`` run at once; the rest wait in a queue. A run that passes its wall-time
deadline or writes more than ``max_output`` bytes on a stream is SIGKILLed with its process group at
once. EOF on the control socket (the pool closed, or its process died) kills every child and ends the
server: no orphans, no zombies. Messages in both directions are framed by sandbox/protocol.py.
"""
import collections
import fcntl
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from nanotorl.sandbox import child, isolation, landlock, protocol
from nanotorl.sandbox.policy import RUN, SERVER, Filter

PR_SET_DUMPABLE = 4
PROBE_ID = -1
MARKERS = child.READY + child.STARTED
OWN_PACKAGES = ("nanotorl",)  # never readable by runs: where it is installed editable, that is the repository
RETRIES = 2  # children, after the first, that get a run's code when the one before died without running it


@dataclass(eq=False)
class Run:
    """One child: spawned (confined, waiting for its code on stdin), then dispatched (running)."""
    pid: int
    pidfd: int
    code_w: int                                    # write end of the child's stdin (non-blocking)
    pipes: dict                                    # read ends of stdout and stderr: fd -> "stdout" | "stderr"
    slot: int
    id: int = 0
    start: float = 0.0
    deadline: float = 0.0
    source: str = ""                               # the run's code
    tries: int = 0                                 # children that died before they could run it
    code: memoryview = memoryview(b"")             # what is still to be written to the child's stdin
    output: dict = field(default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()})
    markers: int = 0                               # of READY + STARTED seen on stdout (2: the code ran)
    truncated: set = field(default_factory=set)    # streams that passed the cap
    status: int | None = None                      # wait status, once reaped
    wall_time: float = 0.0
    cpu_time: float = 0.0
    reason: str | None = None                      # why we killed it


class Zygote:
    """The event loop that forks, watches and reports runs."""

    def __init__(self, cfg: dict, ctrl: socket.socket, namespaces: list[str]):
        self.cfg, self.ctrl, self.namespaces = cfg, ctrl, namespaces
        self.epoll = select.epoll()
        self.epoll.register(ctrl.fileno(), select.EPOLLIN)
        self.owner: dict[int, Run] = {}  # watched fd (pipe, pidfd, code pipe) -> its child
        self.inbox = bytearray()
        self.queue: collections.deque[tuple] = collections.deque()  # (id, code, tries) waiting for a child
        self.spare: collections.deque[Run] = collections.deque()  # confined children waiting for code
        self.spares_wanted = 0  # ``workers`` once start-up has settled how runs are confined
        self.running: dict[int, Run] = {}
        self.children: set[Run] = set()  # every child not yet reaped: spare, running or being killed
        self.free_slots = list(range(3 * cfg["workers"] + 2))  # spares, runs, and children killed but not yet reaped
        self.probe: dict | None = None
        self.jail: child.Confinement | None = None

    # -- start-up ---------------------------------------------------------------------------------
    def start_up(self) -> dict:
        """Preload, set up what runs share, install and probe the filter; return the ready message."""
        try:
            os.close(os.pidfd_open(os.getpid()))
            if not hasattr(os, "P_PIDFD"):  # waitid() on a pidfd: how a stopped spare is found
                raise OSError("no waitid(P_PIDFD)")
        except (AttributeError, OSError) as e:
            return {"error": f"sandbox: needs pidfds (Linux 5.4+), found kernel {os.uname().release} ({e!r})"}
        for name in self.cfg["preload"]:
            try:
                importlib.import_module(name)
            except Exception as e:
                return {"error": f"preload: could not import {name!r} ({type(e).__name__}: {e}); "
                                 "install it or remove it from SandboxPool(preload=...)"}
        try:
            exec(compile(self.cfg["warmup"], "<warmup>", "exec"), {"__name__": "__warmup__"})
        except Exception as e:
            return {"error": f"warmup: the code failed ({type(e).__name__}: {e}); fix SandboxPool(warmup=...)"}
        workdir = os.getcwd()
        switch_uid = os.geteuid() == 0
        cgroup, no_cgroup = isolation.make_pids_cgroup(self.cfg["cgroup_name"], len(self.free_slots),
                                                       isolation.TASKS)
        roots = isolation.share_import_roots(landlock.installation_roots(OWN_PACKAGES))
        self.jail = child.Confinement(workdir, [], None, landlock.Allowlist.open(roots, workdir), cgroup,
                                      switch_uid, tuple(child.generators()))
        gc.freeze()  # children never touch the preloaded objects' GC headers: fewer copy-on-write faults
        isolation.use_huge_pages()
        child.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # runs (which inherit this) cannot read our memory or each other's
        os.environ.clear()
        os.environ.update(child.ENV, HOME=workdir, TMPDIR=workdir)
        base = child.vm_bytes()
        self.jail.limits = child.resource_limits(self.cfg["cpu_time"], base + (self.cfg["memory_mb"] << 20),
                                                 isolation.TASKS if switch_uid else None)
        problem = self.install_and_probe()
        if problem:
            if not self.cfg["allow_unconfined"]:
                return {"error": f"sandbox: cannot confine runs on this machine ({problem}). Refusing to run "
                                 "untrusted code unconfined; pass allow_unconfined=True to do it anyway."}
            self.jail.seccomp = None
        self.spares_wanted = self.cfg["workers"]
        return {"ready": {"pid": os.getpid(), "namespaces": self.namespaces, "seccomp": self.jail.seccomp is not None,
                          "problem": problem, "base_vm_mb": base >> 20, "arch": os.uname().machine,
                          "run_uids": switch_uid, "pids_cgroup": cgroup or no_cgroup, "cgroup": cgroup,
                          "import_roots": len(roots), "landlock": self.jail.allowlist.version}}

    def install_and_probe(self) -> str | None:
        """Install the SERVER program, then run the probe; None if every rule it checks holds."""
        try:
            Filter(SERVER).install(os.getpid())
            self.jail.seccomp = Filter(RUN)
            same_ids = f"ids == {os.getresuid() + os.getresgid()!r}"  # a trainer that is not root: its own ids
            probe = child.PROBE.replace("READS", str(bool(self.jail.allowlist.version)))
            self.submit(PROBE_ID, probe.replace("IDENTITY", child.OWN_ID if self.jail.switch_uid else same_ids))
            while self.probe is None:
                self.step()
        except (OSError, RuntimeError, ValueError) as e:
            return str(e)
        if self.probe["exit_code"] != 0:
            return "the probe run failed: " + self.probe["stderr"].decode(errors="replace").strip()
        return None

    # -- children ----------------------------------------------------------------------------------
    def submit(self, rid: int, code: str) -> None:
        self.queue.append((rid, code, 0))

    def spawn(self) -> Run:
        """Fork a child that confines itself, then blocks reading its code from stdin until EOF.
        Forking and confining ahead of time keeps both out of a run's latency."""
        if not self.free_slots:
            raise OSError("no free slot (every uid of this server is held by a child)")
        fds: list[int] = []
        slot = self.free_slots.pop()
        try:
            fds = [*os.pipe(), *os.pipe(), *os.pipe()]
            server = os.getpid()
            pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            self.free_slots.append(slot)
            raise
        code_r, code_w, out_r, out_w, err_r, err_w = fds
        if pid == 0:  # the child: never returns into this loop
            status = 125
            try:
                uid = isolation.run_uid(slot)
                child.confine((code_r, out_w, err_w), server, self.jail, uid, slot)
                status = child.execute(child.read_code())
            except BaseException as e:  # confinement failed: say so, never run the code
                try:
                    os.write(2, f"sandbox: could not confine the run: {e!r}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(status)
        for fd in (code_r, out_w, err_w):
            os.close(fd)
        fcntl.fcntl(code_w, fcntl.F_SETFL, os.O_NONBLOCK)
        run = Run(pid, os.pidfd_open(pid), code_w, {out_r: "stdout", err_r: "stderr"}, slot)
        self.watch(run, run.pidfd)
        self.children.add(run)
        return run

    def watch(self, run: Run, fd: int, events: int = select.EPOLLIN) -> None:
        self.epoll.register(fd, events)
        self.owner[fd] = run

    def unwatch(self, fd: int) -> None:
        self.epoll.unregister(fd)
        del self.owner[fd]
        os.close(fd)

    def healthy_spare(self) -> Run | None:
        """A spare that is neither dead nor stopped; the others are killed (and reaped when they exit)."""
        while self.spare:
            run = self.spare.popleft()
            state = os.waitid(os.P_PIDFD, run.pidfd, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
            if state is None:
                return run
            signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)
        return None

    def dispatch(self, rid: int, code: str, tries: int) -> None:
        """Hand ``code`` to a spare child (or a new one) and start its clock."""
        try:
            run = self.healthy_spare() or self.spawn()
        except OSError as e:  # out of processes, memory or descriptors: this run fails, the server goes on
            self.deliver({"id": rid, "stdout": b"", "stderr": f"sandbox: could not start the run: {e}\n".encode(),
                          "stdout_truncated": False, "stderr_truncated": False, "exit_code": None, "signal": None,
                          "wall_time": 0.0, "cpu_time": 0.0, "reason": "not_started"})
            return
        run.id, run.source, run.tries, run.start = rid, code, tries, time.monotonic()
        run.deadline = run.start + self.cfg["wall_time"]
        run.code = memoryview(code.encode("utf-8", "surrogatepass"))
        for fd in run.pipes:
            self.watch(run, fd)
        self.running[run.pid] = run
        self.write_code(run)
        if run.code_w >= 0:  # the pipe is full: go on when the child has read some
            self.watch(run, run.code_w, select.EPOLLOUT)

    def write_code(self, run: Run) -> None:
        """Write what the pipe takes now, never blocking; close it once all is written (the child sees EOF)."""
        try:
            while run.code:
                run.code = run.code[os.write(run.code_w, run.code):]
        except BlockingIOError:
            return
        except BrokenPipeError:  # the child died before reading its code; its exit status will tell why
            pass
        self.close_code_pipe(run)

    def close_code_pipe(self, run: Run) -> None:
        if run.code_w in self.owner:
            self.unwatch(run.code_w)
        elif run.code_w >= 0:
            os.close(run.code_w)
        run.code_w = -1

    def kill(self, run: Run, reason: str) -> None:
        """SIGKILL the run's process group and the run itself (not reaped yet, so its pid is still ours)."""
        run.reason = run.reason or reason
        try:
            os.killpg(run.pid, signal.SIGKILL)  # the group: the run is its leader
        except ProcessLookupError:  # no group yet: killed right after fork
            pass
        signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)  # the run itself (safe even as a zombie)

    def on_event(self, run: Run, fd: int) -> None:
        if fd == run.code_w:
            self.write_code(run)
        elif fd != run.pidfd:
            self.read_pipe(run, fd)
        elif run.pid in self.running:
            self.reap(run)
            while run.pipes:  # nobody holds their write ends now, so this cannot block
                self.read_pipe(run, next(iter(run.pipes)))
            self.finish(run)
        else:  # a spare died (or was killed for being stopped): forget it; step() forks another
            if run in self.spare:
                self.spare.remove(run)
            self.reap(run)
            for pipe in run.pipes:
                os.close(pipe)

    def reap(self, run: Run) -> None:
        """Collect the child's exit status and usage, release its pidfd, code pipe and slot."""
        _, run.status, usage = os.wait4(run.pid, 0)
        run.wall_time = time.monotonic() - run.start
        run.cpu_time = usage.ru_utime + usage.ru_stime
        self.unwatch(run.pidfd)
        self.close_code_pipe(run)
        self.children.discard(run)
        self.free_slots.append(run.slot)

    def read_pipe(self, run: Run, fd: int) -> None:
        data = os.read(fd, 1 << 16)
        if not data:
            self.unwatch(fd)
            del run.pipes[fd]
            return
        name = run.pipes[fd]
        while name == "stdout" and run.markers < 2 and data[:1] == MARKERS[run.markers:run.markers + 1]:
            run.markers, data = run.markers + 1, data[1:]  # the child's READY and STARTED bytes are not output
        room = self.cfg["max_output"] - len(run.output[name])
        run.output[name] += data[:room]
        if len(data) > room:  # over the cap: stop reading and end the run now
            run.truncated.add(name)
            self.kill(run, "output_limit")
            for open_fd in list(run.pipes):
                self.unwatch(open_fd)
                del run.pipes[open_fd]

    def finish(self, run: Run) -> None:
        del self.running[run.pid]
        started = run.markers == 2
        if not started and run.reason in (None, "timeout") and run.tries < RETRIES:
            self.queue.appendleft((run.id, run.source, run.tries + 1))  # it died (or hung) before the code ran
            return
        st = run.status
        reason = run.reason if started or run.reason == "output_limit" else "not_started"
        msg = {"id": run.id, "stdout": bytes(run.output["stdout"]), "stderr": bytes(run.output["stderr"]),
               "stdout_truncated": "stdout" in run.truncated, "stderr_truncated": "stderr" in run.truncated,
               "exit_code": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
               "signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
               "wall_time": run.wall_time, "cpu_time": run.cpu_time, "reason": reason}
        self.deliver(msg)

    def deliver(self, msg: dict) -> None:
        if msg["id"] == PROBE_ID:
            self.probe = msg
        else:
            self.ctrl.sendall(protocol.encode(msg))

    # -- the loop ----------------------------------------------------------------------------------
    def on_control(self) -> None:
        data = self.ctrl.recv(1 << 20)
        if not data:
            raise EOFError("the pool closed the control socket")
        self.inbox += data
        for msg in protocol.split_frames(self.inbox):
            self.submit(msg["id"], msg["code"])

    def step(self) -> None:
        """Start queued runs, keep ``workers`` spare children, wait for events or the nearest deadline,
        then kill, reap and report."""
        while self.queue and len(self.running) < self.cfg["workers"]:
            self.dispatch(*self.queue.popleft())
        while len(self.spare) < self.spares_wanted:
            try:
                self.spare.append(self.spawn())
            except OSError:  # no spare now; dispatch() will try again and report the error
                break
        deadlines = [r.deadline for r in self.running.values() if r.reason is None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for fd, _ in self.epoll.poll(-1 if timeout is None else timeout):
            if fd in self.owner:
                self.on_event(self.owner[fd], fd)
            elif fd == self.ctrl.fileno():
                self.on_control()
        now = time.monotonic()
        for run in self.running.values():
            if run.reason is None and now >= run.deadline:
                self.kill(run, "timeout")

    def shutdown(self) -> None:
        """Kill and reap every child, running or spare."""
        for run in list(self.children):
            self.kill(run, "killed")
            os.waitpid(run.pid, 0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    ctrl = socket.socket(fileno=cfg["fd"])
    child.block_stopping_signals()
    namespaces = isolation.enter_namespaces()
    if "pid" in namespaces:
        cgroup = isolation.pids_cgroup_path(cfg["cgroup_name"])  # now: the zygote's /proc will not show us
        zygote = os.fork()
        if zygote:  # the outer process: wait, and take the zygote down with us if we are killed
            ctrl.close()
            _, status = os.waitpid(zygote, 0)  # then every run is gone too: the pid namespace died with it
            isolation.remove_cgroup(cgroup)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        child.prctl(child.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if isolation.mount_fresh_proc():
            namespaces.append("proc")
    zygote = Zygote(cfg, ctrl, namespaces)
    try:
        hello = zygote.start_up()
        zygote.ctrl.sendall(protocol.encode(hello))
        if "error" in hello:
            return
        while True:
            zygote.step()
    except (EOFError, OSError, protocol.ProtocolError):  # the pool went away or is not a pool: end every run
        pass
    finally:
        zygote.shutdown()


if __name__ == "__main__":
    main()
