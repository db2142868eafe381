"""nanotorl/tool.py: what each call says went wrong, the code's failures told apart from the sandbox's own, with a
real sandbox whose server is killed or never answers, through the generator's ToolCall."""
import os
import signal
import time
from concurrent.futures import Future

import pytest

from nanotorl.sandbox import SandboxPool
from nanotorl.sandbox.result import Result
from test_generate import Forced, scripted
from test_sandbox_attacks import zygote_and_children
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.tokenizer import Tokenizer
from nanotorl.tool import SANDBOX_ERROR, error_kind_of, finished_call, observation_block, submit


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


@pytest.mark.parametrize("status, error_line, kind", [
    ("ok", None, None),
    ("error", "NameError: name 'x' is not defined", "NameError"),
    ("error", "SyntaxError: invalid syntax", "SyntaxError"),
    ("error", "ZeroDivisionError: division by zero", "ZeroDivisionError"),
    ("error", "numpy.linalg.LinAlgError: Singular matrix", "LinAlgError"),
    ("error", "KeyboardInterrupt", "KeyboardInterrupt"),
    ("error", "the code printed this to stderr and exited 3", "error"),
    ("error", None, "error"),                        # sys.exit(3): no error line
    ("timeout", None, "timeout"), ("memory", "MemoryError", "memory"), ("output_limit", None, "output_limit"),
    ("denied", "PermissionError: [Errno 1]", "denied"), ("killed", None, "killed")])
def test_error_kind_names_the_exception_or_the_status(status, error_line, kind):
    assert error_kind_of(status, error_line) == kind


def done(value=None, error=None) -> Future:
    f = Future()
    f.set_exception(error) if error else f.set_result(value)
    return f


def test_each_infrastructure_failure_is_one_and_no_code_failure_is():
    infra = [finished_call(done(Result("killed", stderr="sandbox: the server died before this run finished\n",
                                       infra_error=True)), "print(1)"),
             finished_call(done(error=RuntimeError("reader thread died")), "print(1)"),   # the future failed
             submit(type("Broken", (), {"submit": lambda self, code: 1 / 0})(), "print(1)").result()]  # submit raised
    assert [(c.infra_error, c.error_kind, c.status) for c in infra] == [(True, SANDBOX_ERROR, "killed"),
                                                                       (True, SANDBOX_ERROR, "error"),
                                                                       (True, SANDBOX_ERROR, "error")]
    assert [c.observation for c in infra] == ["SandboxError: the server died before this run finished",
                                              "SandboxError: reader thread died", "SandboxError: division by zero"]
    code = [finished_call(done(Result("error", exit_code=1, error_line="NameError: name 'x' is not defined")), "x"),
            finished_call(done(Result("timeout")), "while True: pass"),
            submit(None, "  \n").result()]                                            # an empty block
    assert [(c.infra_error, c.error_kind) for c in code] == [(False, "NameError"), (False, "timeout"),
                                                            (False, "SyntaxError")]
    ok = finished_call(done(Result("ok", "42\n", exit_code=0)), "print(42)")
    assert (ok.infra_error, ok.error_kind, ok.observation) == (False, None, "42")


def call_through_the_generator(tok, pool, code, sabotage, before=False):
    """One response that calls the tool with ``code`` in a real ``pool``; ``sabotage(pool)`` runs just before the
    call reaches the sandbox (``before``) or once its run has started. Returns its ToolCall."""
    block = f"```python\n{code}\n```\n"
    prompt, script, _, _, _ = scripted(tok, block, "done", "x")
    gen = Generator(Forced(script, tok.vocab_size), tok, pool, slots=1, max_len=256)
    real_submit = pool.submit

    def sabotaged_submit(source):
        if before:
            sabotage(pool)
        future = real_submit(source)
        if not before:
            time.sleep(0.3)  # let the run start
            sabotage(pool)
        return future

    pool.submit = sabotaged_submit
    out = gen.generate([Request(prompt, max_new_tokens=200, sampling=SamplingParams(temperature=0.0))])[0]
    assert len(out.tool_calls) == 1 and out.finish_reason in ("eos", "length")
    return out.tool_calls[0]


def test_a_killed_server_is_an_infrastructure_failure_in_the_generators_tool_call(tok):
    with SandboxPool(workers=1, wall_time=30.0, cpu_time=30.0, preload=()) as pool:
        call = call_through_the_generator(tok, pool, "import time\ntime.sleep(20)",
                                          lambda p: os.kill(p.server_pid, signal.SIGKILL))
        assert (call.infra_error, call.error_kind, call.status) == (True, SANDBOX_ERROR, "killed")
        assert call.observation == "SandboxError: the server died before this run finished"
        assert pool.run("print(6 * 7)").stdout == "42\n"  # the pool started a new server


def test_a_server_that_never_answers_is_an_infrastructure_failure_in_the_generators_tool_call(tok):
    def hang(pool):
        zygote, _ = zygote_and_children(pool)
        for pid in {pool.server_pid, zygote}:
            os.kill(pid, signal.SIGSTOP)  # alive and silent: the watchdog replaces it

    with SandboxPool(workers=1, wall_time=1.0, cpu_time=1.0, preload=(), watchdog=2.0) as pool:
        call = call_through_the_generator(tok, pool, "print(1)", hang, before=True)
        assert (call.infra_error, call.error_kind) == (True, SANDBOX_ERROR)
        assert call.observation == "SandboxError: the server gave no result for 2 s and was replaced"


def test_the_codes_own_failures_are_named_and_not_infrastructure(tok):
    with SandboxPool(workers=1, wall_time=1.0, cpu_time=1.0, preload=()) as pool:
        calls = {code: finished_call(submit(pool, code), code)
                 for code in ("print(x)", "def f(:", "1/0", "while True: pass", "import os\nos.fork()")}
    assert {code: (c.error_kind, c.infra_error) for code, c in calls.items()} == {
        "print(x)": ("NameError", False), "def f(:": ("SyntaxError", False), "1/0": ("ZeroDivisionError", False),
        "while True: pass": ("timeout", False), "import os\nos.fork()": ("denied", False)}


# ------------------------------------------------------------------------------- --compat torl: ToRL's observation
# ToRL's rules as written in GAIR-NLP/ToRL verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py (commit cb78cf1),
# re-derived here from its text and applied to what its sandbox would reply for our sandbox's run.


def sandbox_reply(result) -> dict:
    """The reply ToRL's code reads (a SandboxFusion run_result); a request that failed returns {"error": ...}
    (send_request, lines 107-114)."""
    if result is None:
        return {"error": "unknown"}
    return {"run_result": {"return_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}}


def torl_text(reply: dict) -> str:
    """The observation ToRL appends for one reply, from the "```output" its stop string cut off."""
    try:  # postproc, lines 227-234: the run passed if it exited 0 or printed anything
        run = reply["run_result"]
        passed = str(run["return_code"]) == "0" or len(str(run["stdout"])) != 0
        shown = run["stdout"] if passed else run["stderr"].strip()
    except KeyError:
        shown = "UnknownError"                            # line 234, and line 316: not "Done", so the second item
    if "Error" in shown:                                  # line 319: only the last line of a text with "Error"
        shown = shown.strip().split("\n")[-1]
    if len(shown.strip()) == 0:                           # line 320: ToRL's fixed message for an empty text
        shown = TIMED_OUT
    shown = shown.strip()                                 # line 321
    if len(shown) >= 256:                                 # lines 322-323
        shown = shown[:128] + "..." + shown[-128:]
    return "```output\n" + shown + "\n```\n"               # line 324, with OBS_START and OBS_END (lines 77-78)


TIMED_OUT = "timeout_decorator.timeout_decorator.TimeoutError: 'Timed Out'"  # line 320
TORL_CASES = [  # (code, what ToRL shows: a literal for the cases, None where only the rule decides)
    ("x = 1", TIMED_OUT),                                              # exit 0, prints nothing
    ("import sys; sys.exit(3)", TIMED_OUT),
    ("import sys; print('to stderr', file=sys.stderr)", TIMED_OUT),    # only stderr, exit 0
    ("while True: pass", TIMED_OUT),                                   # a silent time-out
    ("print(5); 1/0", "5"),                                            # printed, so passed: the error is not shown
    ("raise Exception('boom')", 'Traceback (most recent call last):\n  File "<code>", line 1, in <module>\n'
                                "Exception: boom"),                    # no "Error": the whole traceback
    ("raise KeyboardInterrupt", 'Traceback (most recent call last):\n  File "<code>", line 1, in <module>\n'
                                "KeyboardInterrupt"),
    ("print('no Error here'); print(42)", "42"),                       # "Error" in stdout: its last line
    ("print(x)", "NameError: name 'x' is not defined"),                # stderr with "Error": its last line
    ("print('  padded  ')", "padded"),
    ("print('a' * 255)", "a" * 255),                                   # 255 characters: kept
    ("print('b' * 200 + 'c' * 56)", "b" * 128 + "..." + "b" * 72 + "c" * 56),    # 256: the first and last 128
    ("print('Error\\n' + 'y' * 300)", None),                             # the last line, then cut
    ("import sys; print('partial'); sys.exit(2)", "partial"),          # stdout without exit 0: passed
    ("raise ValueError('v' * 300)", None),                             # a long error line, cut
    ("print('x' * 100000)", None),                                     # our output limit, then ToRL's cut
    (None, "UnknownError"),                                            # the sandbox itself failed
]


@pytest.mark.parametrize("compat", ["torl", "none"])
def test_compat_torl_observation_is_the_text_torls_wrapper_gives(tok, compat):
    """Each case through the real sandbox: the model's ```output line and the observation after it, in --compat
    torl, are what ToRL's wrapper makes of the same run (and the issue's literal where given). Default mode
    differs on the issue's cases (the compat='none' run checks that the table tells the modes apart)."""
    failed = []
    with SandboxPool(workers=1, wall_time=1.0, cpu_time=1.0, preload=(), max_output=4096) as pool:
        for code, literal in TORL_CASES:
            result = pool.run(code) if code else None
            future = done(result) if code else done(error=RuntimeError("the server died"))
            call = finished_call(future, code or "print(1)", compat)
            ours = "```output\n" + observation_block("```output\n", call.observation, "output", compat)
            expected = torl_text(sandbox_reply(result))
            if (ours, call.observation) != (expected, literal or call.observation):
                failed.append((code, ours, expected))
    if compat == "torl":
        assert failed == []
    else:
        assert len(failed) >= 8, failed
