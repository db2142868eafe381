"""The wire protocol between SandboxPool (pool.py) and its fork server (server.py).

One SOCK_SEQPACKET socket: every message is one packet, ``marshal`` of a dict (marshal, not pickle:
it builds only plain data, never calls code, and is the fastest codec in the stdlib), and may carry
descriptors (SCM_RIGHTS). A run's code and output never travel on it: the pool writes the code into a
memfd and reads the run's stdout and stderr from pipes of its own; the server only passes the
descriptors on to the child that runs the code, so nothing a run reads or writes ever enters the
server's memory, from which later runs are forked.

    pool -> server  {"id": int} + descriptors (code memfd, stdout write end, stderr write end)
                    {"kill": int}: the run passed max_output, end it now
    server -> pool  {"ready": info} or {"error": message} once at start, then one message per run:
                    {"id", "exit_code", "signal", "wall_time", "cpu_time",
                     "reason" (None | "timeout" | "output_limit" | "killed" | "not_started"),
                     "why" (for "not_started": what the server could not do)}

Both ends are non-blocking: a message that does not fit waits in the sender's outbox (``Outbox``).
"""
import collections
import marshal
import os
import socket

MAX_MESSAGE = 1 << 16  # a larger packet means the peer is not speaking this protocol
MAX_FDS = 3


class ProtocolError(Exception):
    """The other side sent something that is not a message of this protocol."""


def encode(msg: dict) -> bytes:
    return marshal.dumps(msg)


def decode(body: bytes) -> dict:
    try:
        msg = marshal.loads(body)
    except (EOFError, ValueError, TypeError) as e:
        raise ProtocolError(f"expected a marshalled dict, found undecodable bytes ({e})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a marshalled dict, found {type(msg).__name__}")
    return msg


def receive(sock: socket.socket) -> tuple[dict, list[int]] | None:
    """The next message and its descriptors; None at EOF. Raises BlockingIOError when none is waiting."""
    body, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"a message longer than {MAX_MESSAGE} bytes or with more than {MAX_FDS} descriptors")
    if not body:
        return None
    try:
        return decode(body), fds
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise


class Outbox:
    """Messages (with descriptors, closed here once sent) waiting for room in a non-blocking socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.waiting = sock, collections.deque()

    def put(self, msg: dict, fds: tuple = ()) -> None:
        self.waiting.append((encode(msg), fds))

    def flush(self) -> bool:
        """Send what the socket takes now; True when nothing is left. Raises OSError when the peer is gone."""
        while self.waiting:
            body, fds = self.waiting[0]
            try:
                socket.send_fds(self.sock, [body], fds) if fds else self.sock.send(body)
            except BlockingIOError:
                return False
            self.waiting.popleft()
            for fd in fds:
                os.close(fd)
        return True

    def drop(self) -> None:
        """Close the descriptors of what was never sent."""
        for _, fds in self.waiting:
            for fd in fds:
                os.close(fd)
        self.waiting.clear()
