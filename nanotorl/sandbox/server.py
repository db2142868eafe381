"""The warm fork server: imports the heavy modules once, then forks one confined child per run.

``SandboxPool`` starts it as ``python -c "from nanotorl.sandbox.server import main; main()" CONFIG``, in its
own session, with a minimal environment and an empty working directory. Start-up, once per server:

    block every signal that would end or stop it (but SIGTERM, and SIGKILL/SIGSTOP, which cannot be)
    unshare(pid, mount, net, ipc [, user when not root])  where the kernel allows it (sandbox/isolation.py)
    fork -> the "zygote", pid 1 of the new pid namespace, mounts a fresh /proc: runs see no process
            outside the sandbox, and when the zygote dies the kernel kills every run with it.
            The outer process only waits (kill it and PR_SET_PDEATHSIG kills the zygote).
    import the preload modules, run the warm-up code, find every random generator, share the
        installation's import directories by descriptor and open the read allowlist (sandbox/landlock.py),
        gc.freeze(), huge pages, not dumpable (no run can read the server's or another run's memory
        through /proc), a minimal os.environ, a pids cgroup where available
    install the SERVER seccomp program (sandbox/policy.py); every run inherits it
    fork the template (with the first child): a copy of the server as it is now, which from then on forks
           every child on the server's request, as the server's own child (clone with CLONE_PARENT), and
           does nothing else, so that the huge pages it was forked with stay whole (the server's loop
           writes all over its heap, which splits them; sandbox/spawn.py)
    probe: one real run checks that both seccomp programs, the run's identity and (with Landlock) the
           read allowlist hold; refuse to serve if they do not, unless the pool was explicitly allowed to
           run unconfined

Then one single-threaded event loop (epoll) over the control socket, the children's pidfds and the
template's socket (its answers: the pids of the spares it forked on request). The pool sends each
run as descriptors only (sandbox/protocol.py): a memfd holding its code and the write ends of the two
pipes the pool reads its output from. The server never reads the code or the output:
they never enter the memory that later runs are forked from. It keeps ``workers`` spare children,
forked and confined ahead of time and blocked on a channel (a socketpair) of their own, so a run
starts with one message that passes its descriptors on (fork and confinement stay off its latency).
Each child holds a slot (its uid and pids cgroup) until it is reaped. A spare that dies is replaced at
once (its pidfd is watched), one that was stopped is killed when it is picked; a child that dies
before it said STARTED on its channel hands the run to another. A run is watched through its pidfd
(readable when it exits; signals through it cannot hit a recycled pid). At most ``workers`` run at
once; the rest wait in a queue. A run that passes its wall-time deadline, or that the pool reports
past ``max_output`` on a stream, is SIGKILLed with its process group at once. Reports go out through
a non-blocking outbox: the server never blocks on a write. EOF on the control socket (the pool
closed, or its process died) kills every child and ends the server: no orphans, no zombies.
"""
import collections
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time

from nanotorl.sandbox import child, isolation, landlock, protocol
from nanotorl.sandbox.policy import RUN, SERVER, Filter
from nanotorl.sandbox.spawn import TEMPLATE_WAIT, Run, Spawning

PR_SET_DUMPABLE = 4
PROBE_ID = -1
OWN_PACKAGES = ("nanotorl",)  # never readable by runs: where it is installed editable, that is the repository
RETRIES = 2  # children, after the first, that get a run's code when the one before died without running it


class Zygote(Spawning):
    """The event loop that forks, watches and reports runs."""

    def __init__(self, cfg: dict, ctrl: socket.socket, namespaces: list[str]):
        self.cfg, self.ctrl, self.namespaces = cfg, ctrl, namespaces
        self.epoll = select.epoll()
        self.epoll.register(ctrl.fileno(), select.EPOLLIN)
        self.owner: dict[int, Run] = {}  # pidfd -> its child
        self.outbox = protocol.Outbox(ctrl)
        self.queue: collections.deque[tuple] = collections.deque()  # (id, descriptors, tries) waiting for a child
        self.spare: collections.deque[Run] = collections.deque()  # confined children waiting for code
        self.spares_wanted = 0  # ``workers`` once start-up has settled how runs are confined
        self.running: dict[int, Run] = {}
        self.children: set[Run] = set()  # every child not yet reaped: spare, running or being killed
        self.free_slots = list(range(3 * cfg["workers"] + 2))  # spares, runs, and children killed but not yet reaped
        self.probe: dict | None = None
        self.jail: child.Confinement | None = None
        self.null = -1  # /dev/null: a spare's stdin and stdout, and every run's stdin
        self.fork = os.fork  # child.fork where start-up finds one thread and no at-fork hook of the preloads
        self.pid = os.getpid()  # every child's parent, whoever forks it
        self.tid_at: int | None = None  # where the template's children find their tid; None: no template
        self.template: tuple[int, socket.socket] | None = None  # its pid and our end of its socket, once started
        self.asked: collections.deque[tuple] = collections.deque()  # (slot, our channel end, when) it has to answer
        self.own_proc = "proc" in namespaces or "pid" not in namespaces  # our /proc shows our children

    # -- start-up ---------------------------------------------------------------------------------
    def start_up(self) -> dict:
        """Preload, set up what runs share, install and probe the filter; return the ready message."""
        try:
            os.close(os.pidfd_open(os.getpid()))
            if not hasattr(os, "P_PIDFD"):  # waitid() on a pidfd: how a stopped spare is found
                raise OSError("no waitid(P_PIDFD)")
        except (AttributeError, OSError) as e:
            return {"error": f"sandbox: needs pidfds (Linux 5.4+), found kernel {os.uname().release} ({e!r})"}
        hooks: list[dict] = []
        with child.noting_at_fork_hooks(hooks):
            problem = self.preload()
        if problem:
            return {"error": problem}
        if child.single_threaded() and not hooks:  # else os.fork: its repairs, and the hooks, are needed
            self.fork = child.fork
            self.tid_at = child.tid_address()  # the template's clone is a raw one too: only here
        workdir = os.getcwd()
        self.null = os.open(os.devnull, os.O_RDWR)
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
            self.end_template()  # its image holds the RUN program: the next one is forked without it
        self.spares_wanted = self.cfg["workers"]
        return {"ready": {"pid": os.getpid(), "namespaces": self.namespaces, "seccomp": self.jail.seccomp is not None,
                          "problem": problem, "base_vm_mb": base >> 20, "arch": os.uname().machine,
                          "run_uids": switch_uid, "pids_cgroup": cgroup or no_cgroup, "cgroup": cgroup,
                          "import_roots": len(roots), "landlock": self.jail.allowlist.version,
                          "raw_fork": self.fork is child.fork, "template": self.tid_at is not None}}

    def preload(self) -> str | None:
        """Import the preload modules and run the warm-up code; what went wrong, if anything."""
        for name in self.cfg["preload"]:
            try:
                importlib.import_module(name)
            except Exception as e:
                return (f"preload: could not import {name!r} ({type(e).__name__}: {e}); "
                        "install it or remove it from SandboxPool(preload=...)")
        try:
            exec(compile(self.cfg["warmup"], "<warmup>", "exec"), {"__name__": "__warmup__"})
        except Exception as e:
            return f"warmup: the code failed ({type(e).__name__}: {e}); fix SandboxPool(warmup=...)"
        return None

    def install_and_probe(self) -> str | None:
        """Install the SERVER program, then run the probe; None if every rule it checks holds."""
        same_ids = f"ids == {os.getresuid() + os.getresgid()!r}"  # a trainer that is not root: its own ids
        probe = child.PROBE.replace("READS", str(bool(self.jail.allowlist.version)))
        probe = probe.replace("IDENTITY", child.OWN_ID if self.jail.switch_uid else same_ids)
        code = os.memfd_create("nanotorl-probe")  # before the filter, which refuses memfd_create
        os.write(code, probe.encode())
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        try:
            Filter(SERVER).install(os.getpid())
            self.jail.seccomp = Filter(RUN)
            self.queue.append((PROBE_ID, (code, out_w, err_w), 0))
            while self.probe is None:
                self.step()
            if self.probe["exit_code"] != 0:  # its stderr is the server's own probe's: it may pass through here
                return "the probe run failed: " + os.read(err_r, 1 << 16).decode(errors="replace").strip()
        except (OSError, RuntimeError, ValueError) as e:
            return str(e)
        finally:
            os.close(out_r)
            os.close(err_r)
        return None

    def healthy_spare(self) -> Run | None:
        """A spare that is neither dead nor stopped; the others are killed (and reaped when they exit)."""
        while self.spare:
            run = self.spare.popleft()
            state = os.waitid(os.P_PIDFD, run.pidfd, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
            if state is None:
                return run
            signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)
        return None

    def dispatch(self, rid: int, fds: tuple, tries: int) -> None:
        """Hand a run's descriptors to a spare child (or a new one) and start its clock."""
        try:
            run = self.healthy_spare() or self.spawn()
        except OSError as e:  # out of processes, memory or descriptors: this run fails, the server goes on
            self.report({"id": rid, "exit_code": None, "signal": None, "wall_time": 0.0, "cpu_time": 0.0,
                         "reason": "not_started", "why": f"could not start the run: {e}"}, fds)
            return
        run.id, run.fds, run.tries, run.start = rid, fds, tries, time.monotonic()
        run.deadline = run.start + self.cfg["wall_time"]
        self.running[run.pid] = run
        try:
            socket.send_fds(run.chan, [b"run"], fds + (run.ruleset,) * (run.ruleset >= 0))
        except OSError:  # the child just died: its exit hands the run to another child
            pass
        self.close_ruleset(run)

    def close_ruleset(self, run: Run) -> None:
        if run.ruleset >= 0:
            os.close(run.ruleset)
            run.ruleset = -1

    def kill(self, run: Run, reason: str) -> None:
        """SIGKILL the run's process group and the run itself (not reaped yet, so its pid is still ours)."""
        run.reason = run.reason or reason
        try:
            os.killpg(run.pid, signal.SIGKILL)  # the group: the run is its leader
        except ProcessLookupError:  # no group yet: killed right after fork
            pass
        signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)  # the run itself (safe even as a zombie)

    def on_exit(self, run: Run) -> None:
        """A child ended: report its run, or forget it if it was a spare (step() forks another)."""
        if run in self.spare:  # died, or killed for being stopped
            self.spare.remove(run)
        self.reap(run)
        if run.pid in self.running:
            self.finish(run)
        run.chan.close()
        self.close_ruleset(run)

    def reap(self, run: Run) -> None:
        """Collect the child's exit status and usage, release its pidfd and slot."""
        _, run.status, usage = os.wait4(run.pid, 0)
        run.wall_time = time.monotonic() - run.start
        run.cpu_time = usage.ru_utime + usage.ru_stime
        self.epoll.unregister(run.pidfd)
        del self.owner[run.pidfd]
        os.close(run.pidfd)
        self.children.discard(run)
        self.free_slots.append(run.slot)

    def finish(self, run: Run) -> None:
        del self.running[run.pid]
        try:
            started = run.chan.recv(1) == child.STARTED  # said before the code ran; still here after it died
        except OSError:
            started = False
        if not started and run.reason in (None, "timeout") and run.tries < RETRIES:
            self.queue.appendleft((run.id, run.fds, run.tries + 1))  # it died (or hung) before the code ran
            return
        st = run.status
        self.report({"id": run.id, "exit_code": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
                     "signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
                     "wall_time": run.wall_time, "cpu_time": run.cpu_time,
                     "reason": run.reason if started or run.reason == "output_limit" else "not_started"}, run.fds)

    def report(self, msg: dict, fds: tuple) -> None:
        """Close our copies of the run's descriptors (the pool then sees its pipes end) and say how it ended."""
        for fd in fds:
            os.close(fd)
        if msg["id"] == PROBE_ID:
            self.probe = msg
        else:
            self.outbox.put(msg)
            self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; wait for room (EPOLLOUT) for the rest, never blocking."""
        done = self.outbox.flush()
        self.epoll.modify(self.ctrl.fileno(), select.EPOLLIN | (0 if done else select.EPOLLOUT))

    # -- the loop ----------------------------------------------------------------------------------
    def on_control(self) -> None:
        """Queue the runs the pool sent; kill the runs it asks us to (they wrote more than max_output)."""
        while True:
            try:
                got = protocol.receive(self.ctrl)
            except BlockingIOError:
                return
            if got is None:
                raise EOFError("the pool closed the control socket")
            msg, fds = got
            if "id" in msg and len(fds) == 3:
                self.queue.append((msg["id"], tuple(fds), 0))
                continue
            for fd in fds:
                os.close(fd)
            if "kill" not in msg:
                raise protocol.ProtocolError(f"expected a run or a kill request, found {sorted(msg)}")
            for run in self.running.values():
                if run.id == msg["kill"] and run.reason is None:
                    self.kill(run, "output_limit")

    def step(self) -> None:
        """Start queued runs, keep ``workers`` spare children, wait for events or the nearest deadline,
        then kill, reap and report."""
        while self.queue and len(self.running) < self.cfg["workers"]:
            self.dispatch(*self.queue.popleft())
        while len(self.spare) + len(self.asked) < self.spares_wanted:
            try:
                self.add_spare()
            except OSError:  # no spare now; dispatch() will try again and report the error
                break
        deadlines = [r.deadline for r in self.running.values() if r.reason is None]
        if self.asked:  # the template's answer is due too
            deadlines.append(self.asked[0][2] + TEMPLATE_WAIT)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for fd, events in self.epoll.poll(-1 if timeout is None else timeout):
            if fd in self.owner:
                self.on_exit(self.owner[fd])
            elif self.template is not None and fd == self.template[1].fileno():
                self.on_template()
            elif events & select.EPOLLOUT:
                self.flush()
            if fd == self.ctrl.fileno() and events & ~select.EPOLLOUT:
                self.on_control()
        now = time.monotonic()
        if self.asked and now >= self.asked[0][2] + TEMPLATE_WAIT:  # stopped, or too slow to be of use
            self.end_template()
        for run in self.running.values():
            if run.reason is None and now >= run.deadline:
                self.kill(run, "timeout")

    def shutdown(self) -> None:
        """Kill and reap every child, running or spare, and the template."""
        self.end_template()
        for run in list(self.children):
            self.kill(run, "killed")
            os.waitpid(run.pid, 0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    ctrl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=cfg["fd"])
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
        zygote.ctrl.setblocking(False)
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
