"""What bench/gpu_check.sh needs on a GPU machine, checked before anything runs; prints what is missing.

    python -m bench.deps                            # exit status 1 if something is missing
    python -m bench.deps --install bench/wheelhouse # first install what is missing from local wheels (no network)
                                                    # into bench/site (put it on PYTHONPATH: gpu_check.sh does)

Checked: the packages of bench/gpu_requirements.txt at the versions it asks for (``bench/wheelhouse.sh`` downloads
them for a machine with no network); every module the GPU tests and benchmarks import (a package the list
forgot shows up there); a C compiler and ``Python.h``, with which Triton builds its launcher on first use; and
torch with a CUDA device.
"""
import argparse
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("gpu_requirements.txt")
SITE = Path(__file__).with_name("site")  # what --install installs, a link to the last complete install
ENTRY_MODULES = ["bench.logprob", "bench.sampling", "bench.decode", "bench.generate", "bench.decode_step",
                 "nanotorl.demo", "pytest", "transformers"]


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _satisfies(version: str, spec: str) -> bool:
    """``version`` against a specifier like ">=4.45" or "<2.4,>=1.26" (numeric releases only)."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
           ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    v = _version(version)
    return all(ops[op](v[:len(_version(ref))], _version(ref))
               for op, ref in re.findall(r"(>=|<=|==|!=|>|<)\s*([\d.]+)", spec))


def requirements() -> list[tuple[str, str]]:
    """(distribution, version specifier) per line of bench/gpu_requirements.txt."""
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups() for line in lines if line]


def missing() -> list[str]:
    """Everything missing, one line each (empty when all is there)."""
    out = []
    for name, spec in requirements():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"package {name}{spec}: not installed")
            continue
        if not _satisfies(version, spec):
            out.append(f"package {name}{spec}: {version} installed")
    for module in ENTRY_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            out.append(f"module {module}: {e}")
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "gcc", "clang")):
        out.append("a C compiler (cc, gcc or clang): Triton compiles its kernel launcher with it")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        out.append(f"Python.h in {sysconfig.get_paths()['include']} (python3-dev): Triton's launcher includes it")
    out += _torch_and_triton()
    return out


def _torch_and_triton() -> list[str]:
    try:
        import torch
        import triton
    except ImportError as e:
        return [f"torch and triton: {e}"]
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    return [] if torch.cuda.is_available() else [f"a CUDA device: torch {torch.__version__} sees none"]


def install(wheelhouse: Path, site: Path = SITE) -> bool:
    """pip-install the requirements from the local wheels into a fresh folder beside ``site``, and only if that
    succeeded point the link ``site`` at it (one atomic rename) and remove the install it pointed at before. A
    run cut half way (gpu_check.sh's time limit) leaves ``site`` as it was: never a half-installed package; the
    folder it left is removed by the next install."""
    current = site.resolve() if site.is_symlink() else None
    for left in site.parent.glob(site.name + "-*"):  # folders (and links) of installs cut short
        if left.is_symlink():
            left.unlink()
        elif left.resolve() != current:
            shutil.rmtree(left, ignore_errors=True)
    fresh = Path(tempfile.mkdtemp(prefix=site.name + "-", dir=site.parent))
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse),
                          "--target", str(fresh), "-r", str(REQUIREMENTS)], check=False)
    if run.returncode != 0:
        shutil.rmtree(fresh, ignore_errors=True)
        return False
    link = site.with_name(f"{fresh.name}.link")
    link.symlink_to(fresh.name)
    os.replace(link, site)
    if current is not None:
        shutil.rmtree(current, ignore_errors=True)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", metavar="WHEELHOUSE", help="install missing packages from these wheels first")
    args = parser.parse_args()
    if args.install and Path(args.install).is_dir() and missing():
        print("installed into bench/site" if install(Path(args.install)) else "install failed: bench/site unchanged")
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()
    problems = missing()
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for line in problems:
        print(f"missing: {line}")
    print("dependencies: all present" if not problems else f"dependencies: {len(problems)} missing")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
