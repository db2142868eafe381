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
           writes all over its heap, which splits them; see "the template" below)
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
import errno
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass

from nanotorl.sandbox import child, isolation, landlock, protocol
from nanotorl.sandbox.policy import RUN, SERVER, Filter

PR_SET_DUMPABLE = 4
PROBE_ID = -1
OWN_PACKAGES = ("nanotorl",)  # never readable by runs: where it is installed editable, that is the repository
RETRIES = 2  # children, after the first, that get a run's code when the one before died without running it
TEMPLATE_WAIT = 1.0  # seconds the template may take to answer (its clone takes under 1 CPU-ms), then it is replaced
RIGHTS_ONE = socket.CMSG_SPACE(4)  # room for the channel descriptor the template receives with each request


@dataclass(eq=False)
class Run:
    """One child: spawned (confined, waiting for its run's descriptors), then dispatched (running)."""
    pid: int
    pidfd: int
    chan: socket.socket                            # its channel: the run's descriptors go out, STARTED comes back
    slot: int
    id: int = 0
    start: float = 0.0
    deadline: float = 0.0
    fds: tuple = ()                                # the pool's code memfd and output pipes, held until reported
    ruleset: int = -1                              # its Landlock ruleset, until handed to it
    tries: int = 0                                 # children that died before they could run it
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

    # -- children ----------------------------------------------------------------------------------
    def new_channel(self) -> tuple[int, socket.socket, socket.socket]:
        """A free slot and a new child's channel: (slot, our end, its end)."""
        if not self.free_slots:
            raise OSError("no free slot (every uid of this server is held by a child)")
        slot = self.free_slots.pop()
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            self.free_slots.append(slot)
            raise
        return slot, ours, theirs

    def spawn(self) -> Run:
        """A child now, that confines itself, then blocks on its channel until a run's descriptors arrive:
        the template's next one where there is a template, else forked here."""
        if self.tid_at is not None:
            try:
                if not self.asked:
                    self.ask()
                return self.answer(TEMPLATE_WAIT)
            except (ConnectionError, TimeoutError):  # it died or hangs: a new one next time
                self.end_template()
            except OSError:
                if self.tid_at is not None:  # out of slots, processes or memory: so would we be
                    raise
        slot, ours, theirs = self.new_channel()
        try:
            pid = self.fork()
        except OSError:
            ours.close()
            theirs.close()
            self.free_slots.append(slot)
            raise
        if pid == 0:  # the child
            self.become_run(theirs, slot)
        theirs.close()
        return self.watch(pid, ours, slot)

    def add_spare(self) -> None:
        """Ask the template for a spare (step() takes it when the answer comes), or fork one here."""
        if self.tid_at is None:
            self.spare.append(self.spawn())
            return
        try:
            self.ask()
        except (ConnectionError, TimeoutError):
            self.end_template()
            raise

    def watch(self, pid: int, ours: socket.socket, slot: int) -> Run:
        """Start watching a new child (``ours``: our end of its channel)."""
        ours.setblocking(False)
        run = Run(pid, os.pidfd_open(pid), ours, slot)
        try:  # the child's own /proc/<pid>, where our /proc shows our pid namespace
            run.ruleset = self.jail.allowlist.ruleset(pid if self.own_proc else None)
        except OSError:  # the child then refuses to run anything; it is replaced when it exits
            pass
        self.epoll.register(run.pidfd, select.EPOLLIN)
        self.owner[run.pidfd] = run
        self.children.add(run)
        return run

    def become_run(self, channel: socket.socket, slot: int) -> None:
        """In a new child: confine, wait for the run on ``channel``, run it and exit; never returns."""
        status = 125
        try:
            uid = isolation.run_uid(slot)
            child.confine((self.null, self.null, 2), channel.fileno(), self.pid, self.jail, uid, slot)
            status = child.execute(child.receive(channel, self.jail))
        except BaseException as e:  # confinement failed: say so, never run the code
            try:
                os.write(2, f"sandbox: could not confine the run: {e!r}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(status)

    # -- the template --------------------------------------------------------------------------------
    # Every fork copies the forking process's page tables, and every write after it, in either process,
    # copies a page. The server writes all over its heap between forks (its loop, its Run objects, pymalloc
    # reusing freed blocks anywhere), which splits the huge pages use_huge_pages() made back into 4 KiB ones:
    # forking the server itself costs ~12k page-table entries per run. So the server forks, once, a template:
    # a copy of itself with the preloads, the confinement and the RUN program ready, that does nothing but
    # fork children on request, in a loop that writes few pages, so that its huge pages stay whole. It forks
    # them with CLONE_PARENT (child.fork_sibling): they are the server's children, which it watches, reaps and
    # kills as it does the ones it forks itself. What the template's image cannot know per child, it is sent:
    # the slot and the child's channel; the child's Landlock ruleset goes to the child on its channel, as
    # ever. The server asks for spares without waiting (the template's answer, the child's pid, is an event of
    # its loop), and waits only when a run finds no spare. The template holds nothing of the runs (no code, no
    # output), dies with the server (parent-death signal; in a pid namespace, with its init as well), and one
    # that dies or leaves a request unanswered for TEMPLATE_WAIT is killed and replaced, the server forking a
    # child itself meanwhile where a run waits for one.
    def ask(self) -> None:
        """Ask the template (started if need be) for a child: send the slot and the child's channel."""
        if self.template is None:
            self.start_template()
        slot, ours, theirs = self.new_channel()
        try:
            socket.send_fds(self.template[1], [slot.to_bytes(4, "little")], [theirs.fileno()])
        except OSError:
            ours.close()
            self.free_slots.append(slot)
            raise
        finally:
            theirs.close()  # the template holds it now
        self.asked.append((slot, ours, time.monotonic()))

    def answer(self, wait: float) -> Run:
        """The child of the oldest request the template has not answered yet, within ``wait`` seconds (0: it
        has answered). Raises what its clone raised, and drops the template when its clone is refused for
        good (EPERM, EINVAL: we fork every child from then on)."""
        sock = self.template[1]
        sock.settimeout(wait)
        got = sock.recv(4)
        if len(got) != 4:
            raise ConnectionError("the template closed its socket")
        slot, ours, _ = self.asked.popleft()
        pid = int.from_bytes(got, "little", signed=True)
        if pid < 0:  # it could not fork
            ours.close()
            self.free_slots.append(slot)
            if -pid not in (errno.EAGAIN, errno.ENOMEM):
                self.end_template()
                self.tid_at = None
            raise OSError(-pid, f"the template's clone failed: {os.strerror(-pid)}")
        return self.watch(pid, ours, slot)

    def on_template(self) -> None:
        """The template answered (a new spare), or died."""
        try:
            if not self.asked:
                raise ConnectionError("the template spoke unasked")
            self.spare.append(self.answer(0.0))
        except (ConnectionError, TimeoutError):
            self.end_template()
        except OSError:  # no spare now; step() asks again
            pass

    def start_template(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = self.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            try:
                self.serve_as_template(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.template = (pid, ours)
        self.epoll.register(ours.fileno(), select.EPOLLIN)

    def end_template(self) -> None:
        """Kill and reap the template; kill and reap the children it forked but we did not take yet, and
        release what its unanswered requests held."""
        if self.template is None:
            return
        pid, sock = self.template
        self.template = None
        self.epoll.unregister(sock.fileno())
        os.kill(pid, signal.SIGKILL)  # our child, not reaped yet: the pid is still its
        os.waitpid(pid, 0)
        sock.setblocking(False)
        for slot, ours, _ in self.asked:
            try:  # an answer it sent before it died: that child is ours, and nobody else knows it
                got = sock.recv(4)
            except OSError:
                got = b""
            if len(got) == 4 and int.from_bytes(got, "little", signed=True) > 0:
                lost = int.from_bytes(got, "little", signed=True)
                os.kill(lost, signal.SIGKILL)
                os.waitpid(lost, 0)
            ours.close()
            self.free_slots.append(slot)
        self.asked.clear()
        sock.close()

    def serve_as_template(self, sock: socket.socket) -> None:
        """In the template: fork a child for every request until the server is gone."""
        child.prctl(child.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.pid:  # the server died before the prctl
            return
        keep = sorted({sock.fileno(), self.null, *self.jail.allowlist.fds})  # and stdio: the runs' stderr, until
        for lo, hi in zip([3] + [fd + 1 for fd in keep], keep + [child.MAX_FD]):  # their own arrives
            os.closerange(lo, hi)
        isolation.use_huge_pages()  # again: its first writes split pages it shared with the server (here ~8 of 38 MB)
        while True:
            request, ancillary, _, _ = sock.recvmsg(4, RIGHTS_ONE)
            if not ancillary:  # the server closed its end
                return
            slot = int.from_bytes(request, "little")
            fd = int.from_bytes(ancillary[0][2][:4], sys.byteorder, signed=True)
            # made here, not in the child: there it would write ~50 pages (copies), here it writes the same few
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fd)
            try:
                pid = child.fork_sibling(self.tid_at)
            except OSError as e:
                pid = -e.errno
            if pid == 0:
                self.become_run(channel, slot)
            channel.close()
            sock.send(pid.to_bytes(4, "little", signed=True))

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
