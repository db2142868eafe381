"""Run one benchmark from any directory: ``python /path/to/nanotorl/bench NAME [ARGS]`` (NAME: rollout, sandbox, ...).

From the repository root ``python -m bench.NAME [ARGS]`` does the same. The benchmarks are not installed with
nanotorl (only the package ``nanotorl`` is), so elsewhere this entry puts the repository root on ``sys.path`` in
place of this folder (whose files would otherwise shadow modules named like them) and runs ``bench.NAME``.
"""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    names = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python {HERE} NAME [ARGS], NAME one of: {', '.join(names)}")
    if sys.path[0] in (HERE, ""):
        sys.path[0] = os.path.dirname(HERE)
    name = sys.argv.pop(1)
    sys.argv[0] = os.path.join(HERE, f"{name}.py")
    runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
