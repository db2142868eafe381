"""The corpus of model-style programs that the seccomp allowlist (sandbox/policy.py) was derived from.

Each program is what a math model writes in a ```python block: plain Python, math, fractions, decimal,
itertools, collections, numpy, sympy (solve, simplify, integrate, series, matrices, primes), printing,
exceptions, recursion, threads, its own time-outs with signal.alarm. Every one must give, inside the
sandbox and in both namespace modes, exactly what ``python -c`` gives outside it (stdout; the last
error line for programs that fail on purpose). When a library upgrade needs a new syscall, this test
fails with the program that needs it; ``test_corpus_syscalls_are_all_allowed`` then names the call
(it traces the corpus unconfined with strace and checks every syscall against the table).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from nanotorl.sandbox.policy import NOSYS, POLICY, run_allows

CORPUS = {
    "arithmetic": "print(2**100, 7 // 2, -7 % 3, 10 / 4, round(2.675, 2), f'{1/3:.5f}', divmod(17, 5))",
    "math": ("import math\nprint(math.gcd(84, 36), math.lcm(4, 6), math.comb(30, 12), math.isqrt(10**20 + 1),\n"
             "      math.factorial(25), math.log(1e6, 10), math.sin(math.pi / 6), math.hypot(3, 4), math.prod([1, 2, 3]))"),
    "fractions-decimal": ("from fractions import Fraction\nfrom decimal import Decimal, getcontext\n"
                          "getcontext().prec = 50\nprint(Fraction(3, 4) + Fraction(5, 6), Decimal(2).sqrt(), Decimal(1) / 7)"),
    "itertools": ("import itertools\nprint(sum(1 for p in itertools.permutations(range(7)) if p[0] < p[-1]),\n"
                  "      len(list(itertools.combinations(range(20), 3))), list(itertools.accumulate([1, 2, 3, 4])),\n"
                  "      sum(1 for t in itertools.product(range(6), repeat=3) if sum(t) == 9))"),
    "collections": ("from collections import Counter, defaultdict, deque\nimport heapq, bisect, functools\n"
                    "c = Counter('mississippi')\nd = defaultdict(list)\nfor w in ['ab', 'ba', 'cd']:\n"
                    "    d[''.join(sorted(w))].append(w)\nq = deque([1, 2, 3], maxlen=2)\nh = [5, 1, 4]\n"
                    "heapq.heapify(h)\n@functools.lru_cache(None)\ndef f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)\n"
                    "print(c.most_common(2), dict(d), list(q), heapq.heappop(h), bisect.bisect([1, 3, 5], 4), f(200))"),
    "strings-re-json": ("import re, json, string, textwrap\ns = 'The answer is 42, not 17.'\n"
                        "print(re.findall(r'\\d+', s), json.dumps({'a': [1, 2]}), string.ascii_lowercase[:5],\n"
                        "      textwrap.shorten(s, 12), s[::-1].upper(), 'é'.encode('utf-16'), '%5.2f' % 3.14159)"),
    "statistics-random": ("import statistics, random\nrandom.seed(7)\nxs = [random.randint(1, 100) for _ in range(50)]\n"
                          "print(statistics.mean(xs), statistics.median(xs), round(statistics.stdev(xs), 6), random.choice(xs))"),
    "cmath-complex": "import cmath\nprint(cmath.sqrt(-4), cmath.exp(1j * cmath.pi), abs(3 + 4j), (1 + 2j) ** 3)",
    "numpy": ("import numpy as np\na = np.array([[2.0, 1.0], [1.0, 3.0]])\nb = np.array([3.0, 5.0])\n"
              "rng = np.random.default_rng(0)\nprint(np.linalg.solve(a, b), round(float(np.linalg.det(a)), 6),\n"
              "      np.round(np.linalg.eigvalsh(a), 6), np.roots([1, -3, 2]), np.arange(12).reshape(3, 4).sum(axis=0),\n"
              "      rng.integers(0, 10, 5), np.round(np.fft.fft([1, 0, 0, 0]).real, 3), np.cumsum([1, 2, 3]))"),
    "numpy-large": "import numpy as np\nx = np.arange(1, 2_000_001, dtype=np.int64)\nprint(int((x * x % 7).sum()), x.mean())",
    "sympy-solve": ("import sympy as sp\nx, y = sp.symbols('x y')\nprint(sp.solve(x**2 - 5*x + 6, x),\n"
                    "      sp.solve([x + 2*y - 4, 3*x - y - 5], [x, y]), sp.nsolve(sp.cos(x) - x, x, 1))"),
    "sympy-simplify": ("import sympy as sp\nx = sp.symbols('x')\nprint(sp.simplify((x**2 - 1) / (x - 1)), sp.trigsimp(sp.sin(x)**4 - sp.cos(x)**4),\n"
                       "      sp.factor(x**4 - 16), sp.expand((x + 1)**6), sp.apart(1 / (x**2 - 1)), sp.nsimplify(0.125))"),
    "sympy-calculus": ("import sympy as sp\nx, n = sp.symbols('x n')\nprint(sp.integrate(sp.exp(-x**2), (x, -sp.oo, sp.oo)),\n"
                       "      sp.integrate(x * sp.log(x), x), sp.diff(sp.atan(x), x, 2), sp.limit((1 + 1/n)**n, n, sp.oo),\n"
                       "      sp.series(sp.sin(x), x, 0, 6), sp.summation(1 / n**2, (n, 1, sp.oo)))"),
    "sympy-numbers": ("import sympy as sp\nprint(sp.isprime(2**31 - 1), sp.factorint(2**20 - 1), sp.nextprime(10**12),\n"
                      "      list(sp.primerange(90, 110)), sp.totient(360), sp.divisors(60), sp.Rational(22, 7) - sp.pi.evalf(20),\n"
                      "      sp.binomial(50, 25), sp.Matrix([[1, 2], [3, 4]]).inv(), sp.N(sp.sqrt(2), 40))"),
    "sympy-equations": ("from sympy import *\nx = Symbol('x')\nf = Function('f')\n"
                        "print(dsolve(f(x).diff(x) - f(x), f(x)), solveset(x**2 > 4, x, S.Reals), Poly(x**3 - 1, x).all_roots(),\n"
                        "      latex(Integral(x**2, x)), pretty(sqrt(x), use_unicode=False))"),
    "mpmath": "import mpmath\nmpmath.mp.dps = 40\nprint(mpmath.pi, mpmath.zeta(3), mpmath.quad(mpmath.sin, [0, mpmath.pi]))",
    "printing": ("import sys, pprint\nprint('a', 'b', sep='-', end='|\\n')\nsys.stdout.write('written\\n')\n"
                 "print('\\u00e9\\u4e2d\\U0001f600', file=sys.stdout)\npprint.pprint({i: list(range(i)) for i in range(6)})\n"
                 "print('err', file=sys.stderr)\nfor i in range(300):\n    print(i, end=' ')\nprint()"),
    "exception-caught": ("try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    print('caught', e)\n"
                         "try:\n    int('x')\nexcept ValueError as e:\n    print(type(e).__name__, e)"),
    "exception-uncaught": "def g(v):\n    return {'a': 1}[v]\nprint('before')\ng('b')",
    "exception-in-sympy": "import sympy as sp\nprint('start')\nsp.Matrix([[1, 2], [2, 4]]).inv()",
    "recursion": ("import sys\nsys.setrecursionlimit(20000)\ndef depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
                  "def ack(m, n):\n    return n + 1 if m == 0 else ack(m - 1, 1) if n == 0 else ack(m - 1, ack(m, n - 1))\n"
                  "print(depth(10000), ack(2, 3))"),
    "recursion-limit": "def f(n):\n    return f(n + 1)\nf(0)",
    "own-timeout-alarm": ("import signal, time\nclass Out(Exception):\n    pass\ndef handler(signum, frame):\n    raise Out()\n"
                          "signal.signal(signal.SIGALRM, handler)\nsignal.setitimer(signal.ITIMER_REAL, 0.05)\ntry:\n"
                          "    while True:\n        pass\nexcept Out:\n    print('gave up')\nsignal.alarm(0)"),
    "time-and-sleep": ("import time, datetime\nt0 = time.perf_counter()\ntime.sleep(0.02)\nprint(time.perf_counter() - t0 >= 0.02,\n"
                       "      time.time() > 1.6e9, datetime.date(2024, 3, 1) - datetime.date(2024, 2, 1), time.process_time() >= 0)"),
    "threads": ("from concurrent.futures import ThreadPoolExecutor\nimport threading\n"
                "with ThreadPoolExecutor(4) as ex:\n    print(list(ex.map(lambda n: sum(range(n)), [10, 100, 1000, 10000])))\n"
                "lock = threading.Lock()\nout = []\ndef work(i):\n    with lock:\n        out.append(i * i)\n"
                "ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]\n[t.start() for t in ts]\n"
                "[t.join() for t in ts]\nprint(sorted(out))"),
    "introspection": ("import os, sys, platform\nprint(os.getcwd() != '', os.listdir('.'), sys.version_info >= (3, 10),\n"
                      "      platform.machine() != '', os.cpu_count() > 0, sys.getsizeof(0) > 0, len(os.urandom(8)))"),
    "input-eof": "n = int(input())\nprint(n)",
    "sys-exit": "import sys\nprint('partial answer')\nsys.exit(2)",
}


def reference(code: str) -> subprocess.CompletedProcess:
    """What plain ``python -c`` gives, in an empty directory, with the same single-threaded BLAS."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as empty:
        return subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)


def last_line(text: str) -> str | None:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else None


@pytest.fixture(scope="module", params=["namespaces", "no-namespaces"])
def corpus_pool(request, sandbox_pool_factory):
    yield sandbox_pool_factory(request.param, workers=2, wall_time=20.0, cpu_time=20.0)


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_program_gives_what_python_gives(corpus_pool, name):
    code = CORPUS[name]
    ref = reference(code)
    res = corpus_pool.run(code)
    assert res.stdout == ref.stdout, (name, res)
    assert res.exit_code == ref.returncode, (name, res)
    if ref.returncode:
        assert res.error_line == last_line(ref.stderr), (name, res)
    else:
        assert res.status == "ok", (name, res)


def test_a_run_past_its_time_is_stopped_and_the_next_one_runs(corpus_pool):
    res = corpus_pool.submit("import sympy\nx = sympy.Symbol('x')\nwhile True:\n    sympy.expand((x + 1)**20)").result()
    assert res.status == "timeout" and not res.infra_error, res
    assert corpus_pool.run("print(6 * 7)").stdout == "42\n"


SYSCALL = re.compile(r"^\d+\s+(\w+)\(", re.M)  # strace -f -o: "PID name(args) = result"


def test_corpus_syscalls_are_all_allowed(tmp_path):
    """Every syscall the corpus makes when traced unconfined (after the server's start-up) is one the
    RUN policy allows: the table covers the corpus by construction, not just by the runs above passing."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace): cannot trace the corpus")
    from nanotorl.sandbox.pool import SYMPY_WARMUP
    script = tmp_path / "corpus.py"
    script.write_text("import math, fractions, itertools, numpy, sympy, os, sys\n" + "exec(" + repr(SYMPY_WARMUP) + ")\n"
                      "os.write(2, b'--- corpus ---\\n')\n"
                      f"CORPUS = {dict((k, v) for k, v in CORPUS.items() if k not in ('input-eof',))!r}\n"
                      "for name, code in CORPUS.items():\n"
                      "    try:\n        exec(compile(code, name, 'exec'), {'__name__': '__main__'})\n"
                      "    except (Exception, SystemExit):\n        pass\n")
    log = tmp_path / "trace"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([strace, "-f", "-qq", "-o", str(log), sys.executable, str(script)], cwd=tmp_path, env=env,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    text = log.read_text()
    after = text[text.index("--- corpus ---"):]
    used = set(SYSCALL.findall(after))
    assert {"read", "write", "mmap", "futex"} <= used, f"the trace did not capture the corpus: {sorted(used)}"
    falls_back = {name for names, run, _ in POLICY if run == NOSYS for name in names.split()}  # clone3 -> clone
    refused = sorted(name for name in used - falls_back if not run_allows(name))
    assert not refused, f"the corpus makes syscalls the RUN policy refuses: {refused}"
