"""The pool's side of one fork server: its process, its socket, and the runs sent to it.

Only the pool's I/O thread for this server (``SandboxPool._serve``) calls these methods, so the
state here needs no lock, and no thread ever waits on I/O while it holds one. Per run the pool makes
a memfd holding the code and two pipes, and sends the server the memfd and the pipes' write ends; the
server hands them to the child that runs the code. The pool reads the output itself, caps it at
``max_output`` per stream (one more byte and it asks the server to kill the run, and drops what comes
until the pipes close: a run is SIGKILLed, never ended by a pipe closed under it), and resolves the
run's future once the server has reported the run's end and both pipes are closed. Every socket and
pipe is polled: a full socket waits in the outbox, so neither side blocks on a write the other is
not reading.
"""
import concurrent.futures
import json
import os
import select
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

from nanotorl.sandbox import protocol
from nanotorl.sandbox.result import Result, infra_failure, to_result

START_TIMEOUT = 120.0  # seconds for a server to import its preload modules and answer
READ = select.POLLIN | select.POLLHUP | select.POLLERR


@dataclass(eq=False)
class Pending:
    """A run sent to the server: its future, the read ends of its pipes still open, what they gave."""
    fut: concurrent.futures.Future
    streams: dict                                  # read end -> "stdout" | "stderr", while open
    output: dict = field(default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()})
    truncated: set = field(default_factory=set)    # streams that passed max_output
    end: dict | None = None                        # the server's report of the run's end


def check_hello(hello: dict) -> dict:
    """The server's first message: raise if it refused to start, warn loudly if it runs unconfined."""
    if "error" in hello:
        raise RuntimeError(hello["error"])
    info = hello["ready"]
    if not info["seccomp"]:
        warnings.warn(f"SandboxPool is running untrusted code WITHOUT seccomp ({info['problem']}): "
                      "allow_unconfined=True was passed. Do not do this outside a throwaway machine.",
                      RuntimeWarning, stacklevel=4)
    return info


class Link:
    """One server process, its control socket and the runs sent to it."""

    def __init__(self, cfg: dict, workdir: str, main: str, env: dict, wake: int):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-c", main, json.dumps(dict(cfg, fd=theirs.fileno()))],
                                     env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self.sock, self.outbox, self.blocked = ours, protocol.Outbox(ours), False
        self.max_output, self.cpu_limit = cfg["max_output"], cfg["cpu_time"]
        self.pending: dict[int, Pending] = {}
        self.by_stream: dict[int, int] = {}  # read end -> run id
        self.last_progress = time.monotonic()
        self.thread = None
        self.poller = select.poll()  # not select.select: the trainer may hold more than 1024 descriptors
        self.poller.register(ours, select.POLLIN)
        try:
            got = protocol.receive(ours) if self.poller.poll(START_TIMEOUT * 1000) else None
            if got is None:
                raise RuntimeError(f"sandbox server did not start within {START_TIMEOUT:.0f} s "
                                   f"(exit code {self.proc.poll()}); its stderr above says why")
            self.info = check_hello(got[0])
        except BaseException:
            self.stop()
            raise
        ours.setblocking(False)
        self.poller.register(wake, select.POLLIN)

    def send(self, rid: int, code: str, fut: concurrent.futures.Future) -> None:
        """Queue run ``rid``: its code in a memfd, two pipes for its output, their write ends to the server."""
        opened: list[int] = []
        try:
            opened.append(os.memfd_create(f"nanotorl-run-{rid}", os.MFD_CLOEXEC))
            data = memoryview(code.encode("utf-8", "surrogatepass"))
            while data:
                data = data[os.write(opened[0], data):]
            opened += [*os.pipe(), *os.pipe()]
        except OSError as e:  # out of memory or descriptors: this run fails, the others go on
            for fd in opened:
                os.close(fd)
            fut.set_result(infra_failure(f"could not hand the run over: {e}"))
            return
        memfd, out_r, out_w, err_r, err_w = opened
        if not self.pending:
            self.last_progress = time.monotonic()
        self.pending[rid] = Pending(fut, {out_r: "stdout", err_r: "stderr"})
        for fd in (out_r, err_r):
            self.by_stream[fd] = rid
            self.poller.register(fd, READ)
        self.outbox.put({"id": rid}, (memfd, out_w, err_w))

    def flush(self) -> None:
        """Send what the socket takes now; wait for room (POLLOUT) for the rest."""
        done = self.outbox.flush()
        if done == self.blocked:  # only when that changes: this runs on every turn of the I/O loop
            self.poller.modify(self.sock, select.POLLIN | (0 if done else select.POLLOUT))
            self.blocked = not done

    def on_socket(self) -> bool:
        """Take every message the server has sent; False at EOF."""
        while True:
            try:
                got = protocol.receive(self.sock)
            except BlockingIOError:
                return True
            if got is None:
                return False
            msg, fds = got
            for fd in fds:
                os.close(fd)
            run = self.pending.get(msg.get("id"))
            if run is None or run.end is not None:
                raise protocol.ProtocolError(f"a result for run {msg.get('id')!r}, which is not outstanding")
            self.last_progress, run.end = time.monotonic(), msg
            self.resolve_if_done(msg["id"])

    def on_stream(self, fd: int) -> None:
        """Read what one run wrote on one stream; cap it, and ask the server to end a run that writes too much."""
        rid = self.by_stream[fd]
        run, data = self.pending[rid], os.read(fd, 1 << 16)
        if not data:
            self.close_stream(fd)
        else:
            name = run.streams[fd]
            room = self.max_output - len(run.output[name])
            run.output[name] += data[:room]
            if len(data) > room:  # over the cap: have the run killed now, drop what it writes until then
                if not run.truncated:
                    self.outbox.put({"kill": rid})
                run.truncated.add(name)
        self.resolve_if_done(rid)

    def close_stream(self, fd: int) -> None:
        rid = self.by_stream.pop(fd)
        del self.pending[rid].streams[fd]
        self.poller.unregister(fd)
        os.close(fd)

    def resolve_if_done(self, rid: int) -> None:
        """Resolve the run once the server has reported its end and both of its pipes are closed."""
        run = self.pending[rid]
        if run.end is None or run.streams:
            return
        del self.pending[rid]
        run.fut.set_result(self.result(run))

    def result(self, run: Pending) -> Result:
        end = run.end
        if end["reason"] == "not_started":
            return infra_failure(f"the run could not be started: {end.get('why') or 'its child died first'}")
        msg = dict(end, stdout=bytes(run.output["stdout"]), stderr=bytes(run.output["stderr"]),
                   stdout_truncated="stdout" in run.truncated, stderr_truncated="stderr" in run.truncated)
        if run.truncated:
            msg["reason"] = "output_limit"
        return to_result(msg, self.cpu_limit)

    def fail_all(self, why: str) -> None:
        """Resolve every run still outstanding as an infrastructure failure, saying why."""
        for fd in list(self.by_stream):
            self.close_stream(fd)
        self.outbox.drop()
        lost, self.pending = self.pending, {}
        for run in lost.values():
            run.fut.set_result(infra_failure(why))

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
