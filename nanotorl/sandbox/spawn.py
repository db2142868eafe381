"""How the fork server gets its children (sandbox/server.py mixes this in): forked by its template, or by itself.

Every fork copies the forking process's page tables, and every write after it, in either process,
copies a page. The server writes all over its heap between forks (its loop, its Run objects, pymalloc
reusing freed blocks anywhere), which splits the huge pages use_huge_pages() made back into 4 KiB ones:
forking the server itself costs ~12k page-table entries per run. So the server forks, once, a template:
a copy of itself with the preloads, the confinement and the RUN program ready, that does nothing but
fork children on request, in a loop that writes few pages, so that its huge pages stay whole. It forks
them with CLONE_PARENT (child.fork_sibling): they are the server's children, which it watches, reaps and
kills as it does the ones it forks itself. What the template's image cannot know per child, it is sent:
the slot and the child's channel; the child's Landlock ruleset goes to the child on its channel, as
ever. The server asks for spares without waiting (the template's answer, the child's pid, is an event of
its loop), and waits only when a run finds no spare. The template holds nothing of the runs (no code, no
output), dies with the server (parent-death signal; in a pid namespace, with its init as well), and one
that dies or leaves a request unanswered for TEMPLATE_WAIT is killed and replaced, the server forking a
child itself meanwhile where a run waits for one.

A child of either kind confines itself (``become_run``, sandbox/child.py), then blocks on its channel until a
run's descriptors arrive; the server watches it through a pidfd (``watch``) and holds its slot until it is
reaped.
"""
import errno
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass

from nanotorl.sandbox import child, isolation

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


class Spawning:
    """The server's children and its template; the state it uses is the server's (server.Zygote)."""

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
        # stdio stays open: fd 2 is the runs' stderr until their own arrives
        child.close_all_but((sock.fileno(), self.null, *self.jail.allowlist.fds))
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
