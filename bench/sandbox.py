"""Sandbox throughput and latency: SandboxPool vs `python -c` per run vs Qwen-Agent's PythonExecutor.

    python -m bench.sandbox                      # trivial and sympy code at 1, 2, 4, 8 workers
    python -m bench.sandbox --codes trivial --workers 2 --runs 2000   # the trivial code at 2 workers only
    python -m bench.sandbox --qwen-path DIR      # also Qwen-Agent, installed with
                                                 #   pip install --target DIR "qwen-agent[python_executor]"

Closed loop: ``w`` caller threads each run code back to back, so runs/s is what ``w`` concurrent
callers get and p50/p99 is the latency one caller sees. ``cpu ms/run`` adds up every process
involved (caller, server, runs), so ``2000 / cpu_ms`` is the runs/s two idle cores could sustain,
a figure that does not depend on what else the machine is doing. Ratios are against the naive
baseline measured in the same run at the same worker count.
"""
import argparse
import functools
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

from bench.common import save_result
from nanotorl.metrics import print_table
from nanotorl.sandbox import SandboxPool

CODES = {"trivial": "print(1 + 1)",
         "sympy": "import sympy\nx = sympy.Symbol('x')\nprint(sympy.factor(x**6 - 1))"}
EXPECTED = {"trivial": "2", "sympy": "(x - 1)*(x + 1)*(x**2 - x + 1)*(x**2 + x + 1)"}


def own_cpu() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def closed_loop(call, workers: int, runs: int, extra_cpu=lambda: 0.0) -> dict:
    """``workers`` threads share ``runs`` calls of ``call()``; each call must return the run's stdout."""
    latencies, outputs, lock = [], [], threading.Lock()
    todo = iter(range(runs))

    def worker():
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            t0 = time.perf_counter()
            out = call()
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                outputs.append(out)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    cpu0, t0 = own_cpu() + extra_cpu(), time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    elapsed, cpu = time.perf_counter() - t0, own_cpu() + extra_cpu() - cpu0
    latencies.sort()
    return {"runs": runs, "runs_per_s": runs / elapsed, "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
            "cpu_ms_per_run": cpu / runs * 1e3, "outputs": outputs}


def bench_sandbox(code: str, workers: int, runs: int) -> dict:
    with SandboxPool(workers=workers) as pool:
        server = pool.server_pid
        zygote = next(pid for pid, ppid, _ in _processes() if ppid == server) if "pid" in pool.info["namespaces"] \
            else server
        pool.run(code)  # warm
        return closed_loop(lambda: pool.run(code).stdout, workers, runs, extra_cpu=lambda: tree_cpu(zygote))


def _processes():
    """(pid, ppid, utime + stime + reaped children's, in seconds) of every live process."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):  # not a process, or it just ended
            continue
        if entry.isdigit() and fields[0] not in "ZX":
            yield int(entry), int(fields[1]), sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU of ``pid`` and the children it reaped, and of its live children: a server's template and spares,
    whose CPU enters their parent's only when they are reaped."""
    return sum(cpu for p, ppid, cpu in _processes() if pid in (p, ppid))


def bench_naive(code: str, workers: int, runs: int) -> dict:
    cmd = [sys.executable, "-c", code]
    return closed_loop(lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout,
                       workers, runs)


def load_qwen(path: str | None):
    """Qwen-Agent's PythonExecutor (the executor ToRL's code imports), or None with the reason."""
    if path:
        sys.path.append(path)  # last, so the packages of this environment win
    try:
        from qwen_agent.tools.python_executor import PythonExecutor
    except ImportError as e:
        return None, (f"not importable ({e}); pip install --target DIR 'qwen-agent[python_executor]' "
                      "and pass --qwen-path DIR")
    return PythonExecutor({"timeout_length": 60}), None


def bench_qwen(executor, code: str, workers: int, runs: int) -> dict:
    return closed_loop(lambda: executor.apply(code)[0], workers, runs)  # apply -> (stdout, report)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--codes", default=",".join(CODES), help=f"which of {', '.join(CODES)} to run")
    p.add_argument("--runs", type=int, default=400, help="sandbox runs per row (the baselines run fewer)")
    p.add_argument("--qwen-path", help="directory where qwen-agent[python_executor] was pip-installed --target")
    args = p.parse_args()
    qwen, why_not = load_qwen(args.qwen_path)
    if why_not:
        print(f"Qwen-Agent PythonExecutor: {why_not}")
    rows = []
    for kind in args.codes.split(","):
        code = CODES[kind]
        for w in (int(x) for x in args.workers.split(",")):
            naive_runs = max(2 * w, args.runs // (10 if kind == "trivial" else 50))
            cases = [("sandbox", bench_sandbox, args.runs), ("python -c", bench_naive, naive_runs)]
            if qwen is not None:
                cases.append(("qwen-agent", functools.partial(bench_qwen, qwen), naive_runs))
            base = None
            for name, fn, runs in cases:
                r = fn(code, w, runs)
                wrong = [o for o in r.pop("outputs") if o.strip() != EXPECTED[kind]]
                assert not wrong, f"{name} gave {wrong[0]!r}, expected {EXPECTED[kind]!r}"
                base = base or (r if name == "python -c" else None)
                rows.append({"code": kind, "backend": name, "workers": w, **r})
            for r in rows[-len(cases):]:
                r["x_naive"] = r["runs_per_s"] / base["runs_per_s"]
                r["idle_2core_runs_per_s"] = 2000 / r["cpu_ms_per_run"]
    if qwen is not None:
        qwen.pool.terminate()  # the multiprocess pool its constructor starts (apply() never uses it)
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print_table(rows, ["code", "backend", "workers", "runs", "runs_per_s", "p50_ms", "p99_ms", "x_naive",
                       "cpu_ms_per_run", "idle_2core_runs_per_s"])
    save_result("sandbox", rows)


if __name__ == "__main__":
    main()
