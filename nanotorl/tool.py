"""The tool as the model sees it (ToRL's protocol): what makes a call, and what comes back.

A response calls the tool with a closed ```python block in its own text since the last observation (trigger
'fence'), or, in ToRL's original mode (trigger 'output'), with such a block followed by the model writing
"```output" itself; the exact rules (Markdown's fences, on any tokenization) are in :mod:`nanotorl.fences`. The
code runs in the sandbox, and the result comes back as an observation block

    ```output
    <format_observation(stdout, last error line, ok)>
    ```

on a line of its own (in 'output' mode the model already wrote the opening fence). An empty block and a sandbox
that fails are calls too: the model sees an error, and training goes on.
"""
from concurrent.futures import Future
from dataclasses import dataclass

TIMEOUT_MESSAGE = "TimeoutError: the code ran out of time and printed nothing"


@dataclass
class ToolCall:
    code: str
    status: str        # the sandbox's status, or 'error' for an empty block / a failed sandbox
    observation: str   # what was inserted between the output fences
    wall_time: float


def format_observation(stdout: str, error_line: str | None, ok: bool) -> str:
    """The text ToRL shows the model for one run: stdout if it succeeded, else the last error line; an empty
    result becomes a time-out message; 256 characters or more are cut to the first 128 + "..." + the last 128."""
    text = stdout if ok else (error_line or stdout)
    text = text.strip()
    if not text:
        text = TIMEOUT_MESSAGE
    if len(text) >= 256:
        text = text[:128] + "..." + text[-128:]
    return text


def observation_block(written: str, observation: str, trigger: str) -> str:
    """The text inserted after the response so far (``written``: its last few tokens, decoded)."""
    head = "" if written.endswith("\n") else "\n"
    if trigger == "fence":
        head += "```output\n"
    return f"{head}{observation}\n```\n"


def submit(sandbox, code: str) -> Future:
    """Run ``code`` in ``sandbox``: a future of the sandbox's result, or of a ToolCall error when the block is
    empty or the sandbox itself fails."""
    if not code.strip():
        return _done(ToolCall(code, "error", "SyntaxError: empty code block", 0.0))
    try:
        return sandbox.submit(code)
    except Exception as e:  # the sandbox itself failed: the model sees an error, training goes on
        return _done(ToolCall(code, "error", f"SandboxError: {e}", 0.0))


def finished_call(future: Future, code: str) -> ToolCall:
    """The ToolCall of a finished :func:`submit` future, its observation formatted for the model."""
    try:
        result = future.result()
    except Exception as e:
        return ToolCall(code, "error", f"SandboxError: {e}", 0.0)
    if isinstance(result, ToolCall):
        return result
    text = format_observation(result.stdout, result.error_line, result.status == "ok")
    return ToolCall(code, result.status, text, result.wall_time)


def _done(value) -> Future:
    """A future that already holds ``value`` (for tool calls that need no sandbox run)."""
    f = Future()
    f.set_result(value)
    return f
