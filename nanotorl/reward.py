"""The ToRL reward: the last \\boxed{} answer of the policy's own text, checked against the truth with math-verify.

    reward = (+1 if equivalent(last_boxed(policy text), truth) else -1) - (code_penalty if a code run failed else 0)

Only tokens the policy generated (loss mask 1) are searched for the answer: tool output is spliced into the
response with mask 0 and is decoded separately, so a `\\boxed{}` printed by the sandbox can never be scored as
the model's answer (`policy_segments` then `score`).

The answer, one rule for the whole policy text however tool output cuts it into segments (`final_answer`): the
argument of the last `\\boxed` (or `\\fbox`) the policy wrote; if that box is never closed (the response was cut
off inside it), there is no answer: an earlier box is not taken instead, whether it sits in the same segment or
before a tool call. A box does not reach over tool output: its braces must close in its own segment.

Equivalence (`is_equivalent`) first tries a cheap exact path (normalised strings, exact numbers), then
math-verify (the library ToRL used). math-verify can run for ever on some inputs (sympy expanding
`10^{10^{10}}`), and its own time limit uses SIGALRM, which works only in the main thread. So its checks run in
separate worker processes (`Verifier`) with a hard deadline: a check that misses it kills its worker, a fresh
one replaces it, and the answer counts as not equivalent. Safe to call from any thread.
"""

import atexit
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

from nanotorl.notation import plain_latex

# --------------------------------------------------------------------------------------------- answer extraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _brace_group(text: str, i: int) -> str | None:
    """Content of the brace group opening at text[i] == '{', or None if it is never closed. `\\{`, `\\}` are text."""
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def last_boxed(text: str) -> str | None:
    """The argument of the last `\\boxed` (or `\\fbox`) in `text`, or None if there is none or it is unclosed.

    `\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}` (nested braces kept); `\\boxed 5$` and `\\boxed5` -> `5` (a bare
    argument runs to the next space or `$`). The last command to start wins, so `\\boxed{\\boxed{7}}` gives `7`.
    """
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        return _brace_group(text, i)
    bare = re.match(r"[^\s$]+", text[i:])
    return bare.group(0) if bare else None


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def policy_segments(response_ids, loss_mask, decode) -> list[str]:
    """Decode each maximal run of policy tokens (mask 1) on its own; tool-output tokens (mask 0) are left out.

    response_ids, loss_mask: [T] (lists or 1-D tensors); decode: list[int] -> str.
    """
    ids, mask = _as_list(response_ids), _as_list(loss_mask)
    if len(ids) != len(mask):
        raise ValueError(f"response_ids has {len(ids)} tokens but loss_mask has {len(mask)}; they must match")
    segments, run = [], []
    for token, keep in zip(ids, mask):
        if keep:
            run.append(token)
        elif run:
            segments.append(decode(run))
            run = []
    if run:
        segments.append(decode(run))
    return segments


# ----------------------------------------------------------------------------------------------- fast exact path

_IGNORED = re.compile(r"\\left|\\right|\\[,;:! ]|\^\{?\\circ\}?|\s+")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
_DECIMAL = re.compile(r"-?\d+(\.\d+)?")
_FRAC = re.compile(r"(-?)\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))")  # \frac{12}{5}, \frac34


def _normalise(s: str) -> str:
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "")
    return _IGNORED.sub("", s).strip("$").rstrip(".")


def _number(s: str) -> Fraction | None:
    """Exact value of a normalised plain number: 12, -3.5, 1,000, \\frac{3}{4}, \\frac34, 3/4; else None."""
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    if m := _FRAC.fullmatch(s):
        num, den = m.group(1) + (m.group(2) or m.group(3)), m.group(4) or m.group(5)
    elif m := re.fullmatch(r"(-?\d+)/(\d+)", s):
        num, den = m.groups()
    else:
        return None
    return Fraction(int(num), int(den)) if int(den) != 0 else None


def _fast_equivalent(pred: str, truth: str) -> bool | None:
    """True/False when plain string or exact-number comparison decides, None when math-verify must."""
    a, b = _normalise(pred), _normalise(truth)
    if a == b and a:
        return True
    x, y = _number(a), _number(b)
    if x is None or y is None:
        return None
    if x == y:
        return True
    if "." not in a + b:  # two different exact rationals; a decimal may still be a rounding math-verify accepts
        return False
    return None


# ----------------------------------------------------------------------------------- math-verify in a subprocess

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_STARTUP_LIMIT_S = 120.0


def _serve() -> None:
    """Worker loop: read JSON lines [pred, truth, timeout] on stdin, answer "1"/"0" lines on the original stdout.

    Before each check the worker caps its own CPU time at (used so far + timeout + 2 s): if the parent died
    and cannot kill a hung check, the kernel does (SIGXCPU), so no orphan spins for ever.
    """
    import logging
    import resource
    from functools import lru_cache

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own (signal) timeout is off
    from math_verify import parse, verify

    hard_cpu_limit = resource.getrlimit(resource.RLIMIT_CPU)[1]

    @lru_cache(maxsize=4096)
    def parsed(answer: str):
        return parse("\\boxed{" + answer + "}", parsing_timeout=None)

    out.write("ready\n")
    out.flush()
    for line in iter(sys.stdin.readline, ""):
        pred, truth, timeout = json.loads(line)
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system CPU seconds
        soft = int(used + timeout) + 2
        if hard_cpu_limit != resource.RLIM_INFINITY:
            soft = min(soft, hard_cpu_limit)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard_cpu_limit))
        try:
            ok = bool(verify(parsed(truth), parsed(pred), timeout_seconds=None))
        except Exception:  # a parse or sympy failure means "not shown equivalent"
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


class _Worker:
    """One math-verify process, started on first use and replaced after a missed deadline or a crash."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from nanotorl.reward import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)
        if self._read_line(_STARTUP_LIMIT_S) != "ready":
            code = self.stop()
            raise RuntimeError(
                f"the math-verify worker did not start within {_STARTUP_LIMIT_S:.0f} s (exit code {code}); "
                f"check that `{sys.executable} -c 'import math_verify'` works (pip install math-verify)")

    def _read_line(self, timeout: float) -> str | None:
        """One line from the worker, or None if none arrives within `timeout` seconds or the worker died."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        return line.decode().strip() if line else None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.kill()
        code = self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        self.proc = None
        return code

    def check(self, pred: str, truth: str, timeout: float) -> bool | None:
        """math-verify's verdict, or None if it took longer than `timeout` seconds or crashed (worker replaced)."""
        request = (json.dumps([pred, truth, timeout]) + "\n").encode()
        for _ in range(2):  # a worker that died since the last check is replaced once
            if self.proc is None:
                self._start()  # start-up time is not part of the deadline
            try:
                self.proc.stdin.write(request)
                self.proc.stdin.flush()
                break
            except BrokenPipeError:
                self.stop()
        else:
            return None
        answer = self._read_line(timeout)
        if answer is None:
            self.stop()
            return None
        return answer == "1"


class Verifier:
    """`workers` math-verify processes shared by all threads; each check has a hard deadline.

    verifier.check(pred, truth, timeout) -> bool: math-verify only (no fast path); False on a missed deadline.
    Finished verdicts are cached per (pred, truth) pair; a GRPO group often repeats the same answer.
    """

    def __init__(self, workers: int = 1, cache_size: int = 1 << 16):
        if workers < 1:
            raise ValueError(f"Verifier needs at least 1 worker, got workers={workers}")
        self._workers = [_Worker() for _ in range(workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for worker in self._workers:
            self._idle.put(worker)
        self._cache: dict[tuple[str, str], bool] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        atexit.register(self.close)

    def check(self, pred: str, truth: str, timeout: float = 5.0) -> bool:
        key = (pred, truth)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        worker = self._idle.get()
        try:
            verdict = worker.check(pred, truth, timeout)
        finally:
            self._idle.put(worker)
        if verdict is None:
            return False
        with self._lock:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = verdict
        return verdict

    def close(self) -> None:
        """Stop all worker processes (they are restarted if the verifier is used again)."""
        for worker in self._workers:
            worker.stop()


_default_verifier: Verifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> Verifier:
    """The process-wide Verifier (one worker) used when no other is passed."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = Verifier()
        return _default_verifier


# ------------------------------------------------------------------------------------------------ public scoring


def is_equivalent(pred: str, truth: str, timeout: float = 5.0, *, verifier: Verifier | None = None) -> bool:
    """Is the answer `pred` mathematically the same as `truth`? Both are answer strings (e.g. boxed contents).

    Both are first rewritten as plain LaTeX (:func:`nanotorl.notation.plain_latex`: `45°` -> `45^\\circ`,
    `0.\\overline{3}` -> `\\frac{1}{3}`). Exact fast path first (`\\dfrac{1}{2}` vs `0.5`, `1,000` vs `1000`,
    `30^\\circ` vs `30`); otherwise math-verify with a hard `timeout` in seconds, after which the answer counts as
    not equivalent.
    """
    pred, truth = plain_latex(pred.strip()), plain_latex(truth.strip())  # Unicode symbols, repeating decimals
    if not pred or not truth:
        return False
    fast = _fast_equivalent(pred, truth)
    if fast is not None:
        return fast
    return (verifier or default_verifier()).check(pred, truth, timeout)


def final_answer(segments: list[str]) -> str | None:
    """The answer of the policy's own segments (from `policy_segments`): `last_boxed` of the last segment that
    holds a `\\boxed`, so None when the last box is unclosed, as within one segment (module docstring)."""
    for segment in reversed(segments):
        if _BOX.search(segment):
            return last_boxed(segment)
    return None


class Score(NamedTuple):
    answer: str | None   # the last \boxed{} of the policy's own text
    correct: bool
    reward: float


def score(segments: list[str], truth: str, *, failed_code: bool = False, code_penalty: float = 0.0,
          timeout: float = 5.0, verifier: Verifier | None = None) -> Score:
    """The ToRL reward (module docstring) of one response: +1 if the last `\\boxed{}` over the policy's own
    `segments` is equivalent to `truth`, else -1; minus `code_penalty` if `failed_code`. `segments` come from
    `policy_segments`: tool output is never in them."""
    answer = final_answer(segments)
    correct = answer is not None and is_equivalent(answer, truth, timeout, verifier=verifier)
    return Score(answer, correct, (1.0 if correct else -1.0) - (code_penalty if failed_code else 0.0))
