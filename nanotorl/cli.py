"""How train.py and eval.py end on an error: one line and an exit status, the traceback only with ``--debug``.

    error: data/train.jsonl:4: missing field(s) ['answer']; ...; pass --skip-bad-rows to skip malformed rows

A user error (a file that is missing or malformed, a checkpoint that does not load, a flag value that makes no
sense) prints one ``error: ...`` line on stderr that names the file and line, or the tensor, or the flag, and
exits with status 2, as argparse does for a bad flag (which :class:`ArgumentParser` reports the same way). A run
that a safeguard stopped (:class:`Stop`, e.g. the sandbox failing past ``--tool-failure-limit``) prints its
``error: ...`` line and exits with its status: 1, 2 for an out-dir another run holds, 128 + the signal for a run
stopped by a signal (``stopped: ...``, nanotorl.faults); a rank whose Stop has no line leaves the saying to
rank 0. Anything else is a bug and keeps its traceback. With ``--debug`` nothing is caught: every error shows its
traceback.

User errors are the ``ValueError`` and ``OSError`` that the loaders (nanotorl.data, nanotorl.checkpoint,
nanotorl.tokenizer) and the config checks raise, each message naming what it read. Under torchrun every rank
that fails prints its line, and torchrun then reports the failed ranks itself.
"""
import argparse
import json
import sys
from pathlib import Path

USER_ERRORS = (ValueError, OSError)


class Stop(RuntimeError):
    """A safeguard stopped the run; the message says what failed, how often, and what was kept (empty: say nothing,
    another rank says it), ``status`` is the exit status and ``prefix`` starts the line."""

    def __init__(self, message: str = "", status: int = 1, prefix: str = "error"):
        super().__init__(message)
        self.status, self.prefix = status, prefix


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a flag it refuses (unknown, without its value, a value of the wrong type) prints one
    ``error: ...`` line instead of the usage and the error, and exits with status 2 as argparse does."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_bool(text: str) -> bool:
    """A boolean flag's value: true/false, 1/0, yes/no, on/off."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def wants_debug(argv: list[str]) -> bool:
    """Does ``argv`` ask for ``--debug`` (bare, or with a true value)? Read before the real parser runs, which may
    itself fail."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--debug", nargs="?", const="true", default="false")
    try:
        return parse_bool(parser.parse_known_args(argv)[0].debug)
    except (argparse.ArgumentTypeError, SystemExit):
        return False


def read_json(file) -> dict | list:
    """The JSON content of a file the user gave (a checkpoint's config.json, ...): a ValueError "<file>:<line>:<column>:
    not valid JSON (...)" when it is not, an OSError naming the file when it cannot be read."""
    try:
        return json.loads(Path(file).read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start + 1})") from None


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; an OSError from ``open`` as "<file>: <why>"."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def run(main, argv: list[str] | None = None) -> int:
    """``main(argv)`` as a command: 0 when it returns, else the line and status of the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_debug(argv):
        main(argv)
        return 0
    try:
        main(argv)
    except Stop as e:
        if str(e):
            print(f"{e.prefix}: {one_line(e)}", file=sys.stderr)
        return e.status
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
