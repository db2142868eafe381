"""Try code by hand: ``python -m nanotorl.sandbox 'print(2**100)'``, a file with
``python -m nanotorl.sandbox -f file.py``, or
code on stdin with ``python -m nanotorl.sandbox -``.

CODE is always taken literally, even when it happens to name a file: only ``-f`` reads one (outside
the sandbox, as the user who typed the command). Prints the Result as JSON, ASCII only (every control
character escaped); exits 0 when its status is "ok", 1 otherwise, and 2 with one "error: ..." line when the file
cannot be read or a limit is not positive.
"""
import argparse
import dataclasses
import json
import sys

from nanotorl.sandbox.pool import DEFAULT_PRELOAD, SandboxPool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanotorl.sandbox",
                                description="Run Python code in the nanotorl sandbox.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("code", nargs="?", help="code to run, taken literally; - reads it from stdin")
    source.add_argument("-f", "--file", help="read the code to run from this file")
    p.add_argument("--wall-time", type=float, default=5.0, help="seconds before the run is killed (default 5)")
    p.add_argument("--cpu-time", type=float, default=5.0, help="CPU seconds allowed (default 5)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space the run may add (default 1024)")
    p.add_argument("--max-output", type=int, default=65536, help="bytes kept per stream (default 65536)")
    p.add_argument("--preload", default=",".join(DEFAULT_PRELOAD),
                   help="comma-separated modules the server imports once (default: %(default)s)")
    p.add_argument("--info", action="store_true", help="also print how the runs are confined")
    args = p.parse_args(argv)
    try:
        code = read_code(args)
        preload = tuple(m for m in args.preload.split(",") if m)
        pool = SandboxPool(workers=1, wall_time=args.wall_time, cpu_time=args.cpu_time, memory_mb=args.memory_mb,
                           max_output=args.max_output, preload=preload)
    except (OSError, ValueError) as e:  # a file that cannot be read, a limit that is not positive
        print(f"error: {e}", file=sys.stderr)
        return 2
    with pool:
        result = pool.run(code)
        if args.info:
            print(json.dumps(pool.info, indent=1, ensure_ascii=True))
    print(json.dumps(dataclasses.asdict(result), indent=1, ensure_ascii=True))
    return 0 if result.status == "ok" else 1


def read_code(args) -> str:
    """The code to run: the file of ``-f``, stdin for ``-``, else CODE itself."""
    if args.file is None:
        return sys.stdin.read() if args.code == "-" else args.code
    try:
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"{args.file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{args.file}: not UTF-8 text") from None


if __name__ == "__main__":
    sys.exit(main())
