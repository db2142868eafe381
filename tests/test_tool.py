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
from nanotorl.tool import SANDBOX_ERROR, error_kind_of, finished_call, submit


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
