"""The tool as the model sees it (ToRL's protocol): what makes a call, and what comes back.

A response calls the tool with a closed ```python block in its own text since the last observation (trigger
'fence'), or, in ToRL's original mode (trigger 'output'), with such a block followed by the model writing
"```output" itself; the exact rules (Markdown's fences, on any tokenization) are in :mod:`nanotorl.fences`. The
code runs in the sandbox, and the result comes back as an observation block

    ```output
    <format_observation(stdout, last error line, status)>
    ```

on a line of its own (in 'output' mode the model already wrote the opening fence). An empty block and a sandbox
that fails are calls too: the model sees an error, and the rollout goes on. The fence is a run of backticks longer
than any in the observation (at least 3, CommonMark), so printed text cannot close the block early and forge
text after it; in 'output' mode the model's own ```output line sets the opening fence.

``compat="torl"`` (``--compat torl``) shows what ToRL's code shows instead (:func:`torl_observation`), between
ToRL's three-backtick fences; the README's "ToRL-exact mode" lists every rule with its source.

Every call says what went wrong, if anything (:class:`ToolCall`): ``error_kind`` names it (the exception the code
raised, e.g. "NameError", or the sandbox's status: "timeout", "memory", "output_limit", "denied", "killed"), and
``infra_error`` tells a failure of the sandbox itself (``Result.infra_error``: the server died or stopped answering;
or ``submit`` raised, or its future failed) from a failure of the code. An infrastructure failure is shown to the
model as "SandboxError: <what failed>", and its kind is "SandboxError"; the trainer counts them and stops past
``--tool-failure-limit``.
"""
import re
from concurrent.futures import Future
from dataclasses import dataclass

TIMEOUT_MESSAGE = "TimeoutError: the code ran out of time and printed nothing"
SILENT_MESSAGE = "(the code ran and printed nothing: print() what you want to see)"
COMPAT = ("none", "torl")  # whose rules the prompt, the observation and the tool budget follow
TORL_EMPTY = "timeout_decorator.timeout_decorator.TimeoutError: 'Timed Out'"  # ToRL's text for an empty result
TORL_UNKNOWN = "UnknownError"  # ToRL's text when the sandbox gives no run result
SANDBOX_ERROR = "SandboxError"  # the error kind, and the observation's first word, of an infrastructure failure


@dataclass
class ToolCall:
    code: str
    status: str        # the sandbox's status, or 'error' for an empty block / a failed sandbox
    observation: str   # what was inserted between the output fences
    wall_time: float
    error_kind: str | None = None  # None if the code ran fine, else what went wrong (module docstring)
    infra_error: bool = False      # the sandbox failed, not the code


def error_kind_of(status: str, error_line: str | None) -> str | None:
    """What went wrong in a run of the code: None for "ok"; for "error" the exception's name from the last error
    line ("NameError: name 'x' is not defined" -> "NameError", "numpy.linalg.LinAlgError: ..." -> "LinAlgError"),
    or "error" when that line names none (``sys.exit(3)``); else the status itself ("timeout", "memory", ...)."""
    if status == "ok":
        return None
    if status != "error":
        return status
    name = (error_line or "").split(":", 1)[0].strip()
    return name.rsplit(".", 1)[-1] if name and all(part.isidentifier() for part in name.split(".")) else "error"


def sandbox_failure(code: str, what: str, wall_time: float = 0.0, status: str = "error") -> ToolCall:
    """The call of a run that the sandbox itself failed (``what`` says how)."""
    return ToolCall(code, status, f"{SANDBOX_ERROR}: {what}", wall_time, SANDBOX_ERROR, infra_error=True)


def format_observation(stdout: str, error_line: str | None, status: str) -> str:
    """The text the model sees for one run of ``status`` (a sandbox Result's): stdout if it succeeded, else the
    last error line; an empty result says why it is empty (the code printed nothing, ran out of time, or ended
    with ``status``); 256 characters or more are cut to the first 128 + "..." + the last 128."""
    text = (stdout if status == "ok" else (error_line or stdout)).strip()
    if not text:
        text = {"ok": SILENT_MESSAGE, "timeout": TIMEOUT_MESSAGE}.get(
            status, f"(the code ended with status {status} and printed nothing)")
    return shortened(text)


def shortened(text: str) -> str:
    """ToRL's rule for a long observation: 256 characters or more become the first 128 + "..." + the last 128."""
    return text[:128] + "..." + text[-128:] if len(text) >= 256 else text


def torl_observation(stdout: str, stderr: str, exit_code: int | None) -> tuple[str, bool]:
    """(the text ToRL shows for one run, whether ToRL counts it as passed): ToRL's ``postproc`` and
    ``postproc_observation`` (verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py) on our sandbox's result.
    Exit code 0 or any stdout: the stdout, passed; else the stderr. Text holding "Error" keeps only its last
    line; an empty text becomes :data:`TORL_EMPTY`; then :func:`shortened`."""
    passed = exit_code == 0 or bool(stdout)
    text = stdout if passed else stderr.strip()
    if "Error" in text:
        text = text.strip().split("\n")[-1]
    if not text.strip():
        text = TORL_EMPTY
    return shortened(text.strip()), passed


def observation_fence(observation: str) -> str:
    """The backtick fence around ``observation``: longer than any backtick run in it, and at least 3."""
    longest = max((len(run) for run in re.findall("`+", observation)), default=0)
    return "`" * max(3, longest + 1)


def observation_block(written: str, observation: str, trigger: str, compat: str = "none") -> str:
    """The text inserted after the response so far (``written``: its last few tokens, decoded)."""
    head = "" if written.endswith("\n") else "\n"
    fence = "```" if trigger == "output" or compat == "torl" else observation_fence(observation)
    if trigger == "fence":
        head += f"{fence}output\n"
    return f"{head}{observation}\n{fence}\n"


def submit(sandbox, code: str) -> Future:
    """Run ``code`` in ``sandbox``: a future of the sandbox's result, or of a ToolCall error when the block is
    empty or the sandbox itself fails."""
    if not code.strip():
        return _done(ToolCall(code, "error", "SyntaxError: empty code block", 0.0, "SyntaxError"))
    try:
        return sandbox.submit(code)
    except Exception as e:  # the sandbox itself failed: the model sees an error, the rollout goes on
        return _done(sandbox_failure(code, str(e)))


def finished_call(future: Future, code: str, compat: str = "none") -> ToolCall:
    """The ToolCall of a finished :func:`submit` future, its observation formatted for the model (ToRL's way with
    ``compat="torl"``). The future holds a :class:`sandbox.Result` (or anything with its status, stdout, stderr,
    exit_code, error_line and wall_time; without infra_error it counts as the code's outcome)."""
    call = _finished_call(future, code, compat)
    if compat == "torl" and call.infra_error:
        call.observation = TORL_UNKNOWN  # ToRL's postproc: a request without a run result
    return call


def _finished_call(future: Future, code: str, compat: str = "none") -> ToolCall:
    try:
        result = future.result()
    except Exception as e:
        return sandbox_failure(code, str(e))
    if isinstance(result, ToolCall):
        return result
    if getattr(result, "infra_error", False):  # its stderr says what failed: "sandbox: the server died ..."
        what = result.stderr.strip().removeprefix("sandbox:").strip()
        return sandbox_failure(code, what, result.wall_time, result.status)
    if compat == "torl":
        text = torl_observation(result.stdout, result.stderr, result.exit_code)[0]
    else:
        text = format_observation(result.stdout, result.error_line, result.status)
    return ToolCall(code, result.status, text, result.wall_time,
                    error_kind_of(result.status, result.error_line))


def _done(value) -> Future:
    """A future that already holds ``value`` (for tool calls that need no sandbox run)."""
    f = Future()
    f.set_result(value)
    return f
