"""The wire protocol between SandboxPool (pool.py) and its fork server (server.py).

Both directions carry frames: a 4-byte little-endian length, then ``marshal`` of a dict (marshal,
not pickle: it builds only plain data, never calls code, and is the fastest codec in the stdlib).

    pool -> server  {"id": int, "code": str}
    server -> pool  {"ready": info} or {"error": message} once at start, then one message per run:
                    {"id", "stdout", "stderr" (bytes), "stdout_truncated", "stderr_truncated", "exit_code",
                     "signal", "wall_time", "cpu_time",
                     "reason" (None | "timeout" | "output_limit" | "killed")}

The pool blocks on its socket in a reader thread (``read_frame``); the server never blocks and
splits whatever has arrived into frames (``split_frames``).
"""
import marshal
import socket
import struct

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a larger length means the stream is corrupt, not a real message


class ProtocolError(Exception):
    """The other side sent something that is not a frame of this protocol."""


def encode(msg: dict) -> bytes:
    body = marshal.dumps(msg)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict:
    try:
        msg = marshal.loads(body)
    except (EOFError, ValueError, TypeError) as e:
        raise ProtocolError(f"expected a marshalled dict, found undecodable bytes ({e})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a marshalled dict, found {type(msg).__name__}")
    return msg


def split_frames(buffer: bytearray) -> list[dict]:
    """Remove every complete frame from the front of ``buffer`` and return their messages."""
    out = []
    while len(buffer) >= HEADER.size:
        (size,) = HEADER.unpack_from(buffer)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes announced, more than {MAX_FRAME}")
        if len(buffer) < HEADER.size + size:
            break
        out.append(decode(bytes(buffer[HEADER.size:HEADER.size + size])))
        del buffer[:HEADER.size + size]
    return out


def read_frame(sock: socket.socket) -> dict | None:
    """One whole message from a blocking socket, or None at EOF."""
    head = _read_exactly(sock, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes announced, more than {MAX_FRAME}")
    body = _read_exactly(sock, size)
    return None if body is None else decode(body)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        if not data:
            return None
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)
