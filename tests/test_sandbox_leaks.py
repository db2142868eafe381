"""Issue 33, in both namespace modes: a run reads nothing of the trainer's (its working directory, out-dir,
PYTHONPATH, repository, world-readable files outside the installation, other processes' command lines), by
path, through /proc/self/fd, /proc/<pid>/root|cwd or openat on an inherited descriptor; no run finds an
earlier run's code or output anywhere in its own address space; and the pool does not deadlock under
hundreds of concurrent runs with large code and large output on both streams."""
import concurrent.futures
import json
import os
import secrets
import string
import subprocess
import sys
import threading

import pytest

MODES = ["namespaces", "no-namespaces"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "nanotorl-secret-" + secrets.token_hex(8)  # what every file and command line below holds


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """What a trainer has around it: a working directory (this process's, for the module), an out-dir, a
    PYTHONPATH entry, files anyone may read, a host process with a secret on its command line."""
    root = tmp_path_factory.mktemp("trainer")
    files = {}
    for name in ("cwd", "out-dir", "pythonpath", "public"):
        path = root / name
        path.mkdir()
        os.chmod(path, 0o755)
        files[name] = path / ("secret_module.py" if name == "pythonpath" else "secret.txt")
        files[name].write_text(f"TOKEN = {TOKEN!r}\n")
        os.chmod(files[name], 0o644)
    os.chmod(root, 0o755)
    before = os.getcwd()
    os.chdir(root / "cwd")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", TOKEN], env={"SECRET": TOKEN})
    yield {name: str(path) for name, path in files.items()} | {"victim": victim.pid}
    victim.kill()
    victim.wait()
    os.chdir(before)


@pytest.fixture(scope="module", params=MODES)
def pool(request, trainer, sandbox_pool_factory):
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.path.dirname(trainer["pythonpath"])  # the server inherits it
    try:
        return sandbox_pool_factory(request.param, workers=2, wall_time=30.0, cpu_time=30.0, memory_mb=512,
                                    max_output=2 << 20)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


# Every route to a file: by name, through each inherited directory descriptor (by /proc/self/fd/N/.. and by
# openat), through /proc/<pid>/root and /proc/<pid>/cwd of the trainer, the parent and pid 1.
READ_EVERY_WAY = """import json, os
targets, trainer_pid, victim_pid, trainer_cwd = ARGS
got = set()
def attempt(route, opener, needle=b""):
    try:
        data = opener()
    except (OSError, ValueError):
        return
    if data and needle in data:
        got.add(route)
def read(path, dir_fd=None):
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)
for name, (target, needle) in targets.items():
    attempt(f"{name} by path", lambda: read(target), needle)
    for fd in os.listdir("/proc/self/fd"):
        try:
            rel = os.path.relpath(target, os.readlink(f"/proc/self/fd/{fd}"))
        except (OSError, ValueError):
            continue
        attempt(f"{name} by /proc/self/fd/{fd}", lambda: read(f"/proc/self/fd/{fd}/{rel}"), needle)
        attempt(f"{name} by openat({fd})", lambda: read(rel, dir_fd=int(fd)), needle)
    for pid in (trainer_pid, os.getppid(), 1):
        attempt(f"{name} by /proc/{pid}/root", lambda: read(f"/proc/{pid}/root{target}"), needle)
        rel = os.path.relpath(target, trainer_cwd)
        attempt(f"{name} by /proc/{pid}/cwd", lambda: read(f"/proc/{pid}/cwd/{rel}"), needle)
try:
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
except OSError:  # the run may not list /proc: try the ones it knows of
    pids = set()
for pid in pids | {trainer_pid, victim_pid, os.getppid(), 1}:
    if pid != os.getpid():
        for what in ("cmdline", "environ"):
            attempt(f"/proc/{pid}/{what}", lambda: read(f"/proc/{pid}/{what}"))
print(json.dumps(sorted(got)))
"""


def test_a_run_reads_nothing_of_the_trainers(pool, trainer):
    """Each target with what it holds (the start of the file, our token for the files made here); every other
    process's command line and environment must be unreadable, whatever they hold."""
    targets = {name: (path, TOKEN.encode()) for name, path in trainer.items() if name != "victim"}
    shared = os.path.join(os.path.dirname(REPO), "shared", "data")
    for directory, name in ((REPO, "pyproject.toml"), (shared, "")):  # shared: world-readable answers, if there
        for entry in sorted(os.listdir(directory))[:3] if os.path.isdir(directory) and not name else [name]:
            path = os.path.join(directory, entry)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    targets[f"{os.path.basename(directory)}/{entry}"] = (path, f.read(32))
    code = READ_EVERY_WAY.replace("ARGS", repr((targets, os.getpid(), trainer["victim"], os.getcwd())))
    res = pool.run(code)
    assert res.status == "ok", res
    assert json.loads(res.stdout) == [], f"a run read what it must not: {res.stdout}"


def test_the_same_run_still_imports_numpy_and_sympy(pool):
    res = pool.run("import numpy, sympy, fractions\n"
                   "print(int(numpy.arange(5).sum()), sympy.factor(sympy.Symbol('x')**2 - 1))")
    assert (res.status, res.stdout) == ("ok", "10 (x - 1)*(x + 1)\n"), res


# A marker's presence in this process's memory: every readable region of /proc/self/maps but read-only file
# mappings and the kernel's own pages, read with ctypes (a run may not open its /proc/self/mem: it is not dumpable
# and not root), searched for each 64-byte window of WINDOWS as two 32-byte halves that must be adjacent (the
# scanner holds the halves apart, as two objects, so it never finds its own copy).
SCAN = """import ctypes
windows = [(bytes.fromhex(a), bytes.fromhex(b)) for a, b in WINDOWS]
found = 0
with open("/proc/self/maps") as f:
    regions = [line.split() for line in f]
for fields in regions:
    name = fields[5] if len(fields) > 5 else ""
    if not fields[1].startswith("r") or name.startswith(("[v", "/")) and "w" not in fields[1] or name[:2] == "[v":
        continue
    lo, hi = (int(x, 16) for x in fields[0].split("-"))
    tail = b""
    for start in range(lo, hi, 1 << 24):
        data = tail + ctypes.string_at(start, min(1 << 24, hi - start))
        for first, second in windows:
            i = data.find(first)
            while i >= 0:
                found += data[i + 32:i + 64] == second
                i = data.find(first, i + 1)
        tail = data[-63:]
print(found)
"""


def windows(marker: str) -> list[tuple[str, str]]:
    """Three 64-byte windows of the marker (start, middle, end), each as two hex halves."""
    raw = marker.encode()
    return [(raw[i:i + 32].hex(), raw[i + 32:i + 64].hex()) for i in (0, len(raw) // 2, len(raw) - 64)]


def test_no_later_run_finds_an_earlier_runs_code_or_output(pool):
    markers = ["".join(secrets.choice(string.ascii_letters) for _ in range(size)) for size in (4 << 10, 1 << 20)]
    for marker in markers:
        res = pool.run(f"import sys\nM = {marker!r}\nprint(M)\nprint(M, file=sys.stderr)")
        assert (res.status, res.stdout) == ("ok", marker + "\n"), res.stderr[-500:]
    scan = SCAN.replace("WINDOWS", repr([w for marker in markers for w in windows(marker)]))
    unseen = "".join(secrets.choice(string.ascii_letters) for _ in range(4096))
    assert pool.run(SCAN.replace("WINDOWS", repr(windows(unseen)))).stdout == "0\n", "the scanner finds itself"
    counts = [pool.run(scan) for _ in range(4)]  # later children, forked after the markers passed
    assert [(r.status, r.stdout) for r in counts] == [("ok", "0\n")] * 4, [(r.status, r.stdout, r.stderr[-300:])
                                                                            for r in counts]


def test_the_scanner_finds_a_marker_in_its_own_memory(pool):
    marker = "".join(secrets.choice(string.ascii_letters) for _ in range(4096))
    res = pool.run(f"M = {marker!r}\n" + SCAN.replace("WINDOWS", repr(windows(marker))))
    assert res.status == "ok" and int(res.stdout) >= 1, res


def stress_code(i: int, size: int) -> str:
    return (f"import sys\n# {'#' * size}\nsys.stdout.write('{i}:' + 'o' * {size})\n"
            f"sys.stderr.write('{i}:' + 'e' * {size})\n")


def test_hundreds_of_concurrent_runs_with_large_code_and_output_never_deadlock(pool):
    n, size, limit = 300, 60_000, 240.0
    futures: list = []

    def submit_all():
        for i in range(n):
            futures.append(pool.submit(stress_code(i, size)))

    submitter = threading.Thread(target=submit_all, daemon=True)  # a deadlocked submit must not hang the test
    submitter.start()
    submitter.join(limit)
    done, _ = concurrent.futures.wait(list(futures), timeout=limit)
    if submitter.is_alive() or len(done) < n:
        os.kill(pool.server_pid, 9)  # free the stuck threads, so that the module's pools can close
        pytest.fail(f"deadlock: {len(futures)} of {n} runs submitted, {len(done)} finished in {limit:g} s")
    results = [f.result() for f in futures]
    wrong = [i for i, r in enumerate(results)
             if (r.status, r.stdout, r.stderr) != ("ok", f"{i}:" + "o" * size, f"{i}:" + "e" * size)]
    assert not wrong, f"{len(wrong)} runs gave the wrong result, e.g. {results[wrong[0]].status}"
