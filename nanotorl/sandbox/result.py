"""The outcome of one run, as the pool reports it: what the code did, or that the sandbox failed.

Text that leaves the sandbox is shown on terminals and in logs, and fed back to the model, so every
C0 and C1 control character but newline and tab (and DEL) is written out as a visible escape: ESC
becomes the four characters ``\\x1b``. Clear-screen, window-title and clipboard (OSC 52) sequences
then print as inert text. The observation the model reads therefore keeps the printed text (UTF-8;
invalid bytes become U+FFFD), its newlines and tabs, and shows every other control character as
such an escape.
"""
import re
import signal
from dataclasses import dataclass

CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t and \n, DEL, C1


def neutralise(text: str) -> str:
    """``text`` with every control character but newline and tab written as ``\\xNN``."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@dataclass(frozen=True)
class Result:
    """The outcome of one run.

    status: ok (exit 0) | error (non-zero exit: an exception, sys.exit(n)) | timeout (wall or CPU
    time) | memory (MemoryError at the address-space limit) | output_limit (a stream passed
    max_output bytes) | denied (the sandbox refused an operation: a PermissionError ended the run,
    or the filter killed it with SIGSYS) | killed (a signal the sandbox did not send: the code's own
    crash or os.abort(), an outside kill; or an infrastructure failure, see infra_error).
    stdout/stderr are decoded as UTF-8 with replacement, hold at most max_output bytes each, and show
    control characters as escapes (see the module docstring).
    error_line: the last line of stderr when the run ended with a non-zero exit code, e.g.
    "NameError: name 'x' is not defined" (what ToRL feeds back to the model), else None.
    infra_error: True when the sandbox failed, not the code: the server died or stopped answering
    (the pool's watchdog replaced it) while the run was outstanding, the run could not be started
    (fork or confinement failed, the server could not be restarted), or pool and server stopped
    understanding each other. status is then "killed" and stderr says what failed. False for every
    outcome of the code itself: its exceptions and exit codes, its own time-out, memory limit,
    output limit, denied operations and signals it brought on itself.
    """
    status: str
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    exit_code: int | None = None
    signal: int | None = None
    wall_time: float = 0.0
    cpu_time: float = 0.0
    error_line: str | None = None
    infra_error: bool = False


def infra_failure(what: str) -> Result:
    """The Result of a run that the sandbox could not run or finish, saying why."""
    return Result("killed", stderr=f"sandbox: {what}\n", infra_error=True)


def to_result(msg: dict, cpu_limit: float) -> Result:
    """Turn a server message (sandbox/protocol.py) into a Result, deciding its status."""
    stdout, stderr = (neutralise(msg[k].decode("utf-8", "replace")) for k in ("stdout", "stderr"))
    exit_code, sig, cpu = msg["exit_code"], msg["signal"], msg["cpu_time"]
    if msg["reason"] == "not_started":
        return infra_failure(f"the run could not be started: {stderr.strip() or 'its child died first'}")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    error_line = lines[-1].strip() if exit_code and lines else None
    error_type = (error_line or "").split(":")[0]
    if msg["reason"]:
        status = msg["reason"]
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit):
        status = "timeout"  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
    elif sig == signal.SIGSYS:
        status = "denied"
    elif sig is not None:
        status = "killed"
    elif exit_code == 0:
        status = "ok"
    elif error_type.endswith("MemoryError"):  # also numpy's _ArrayMemoryError
        status = "memory"
    elif error_type == "PermissionError":
        status = "denied"
    else:
        status = "error"
    return Result(status, stdout, stderr, msg["stdout_truncated"], msg["stderr_truncated"], exit_code, sig,
                  msg["wall_time"], cpu, error_line)
