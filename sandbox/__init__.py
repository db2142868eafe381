"""A seccomp-confined Python sandbox with a warm fork server, for model-written code during RL.

    from sandbox import SandboxPool, Result
    with SandboxPool(workers=4) as pool:
        print(pool.run("print(2**100)").stdout)

Files: pool.py (the API), server.py (the fork server), child.py (confinement of one run),
policy.py (the seccomp table and its BPF compiler), protocol.py (the framing between pool and server). ``python -m sandbox CODE`` tries code by hand.
"""
from sandbox.pool import DEFAULT_PRELOAD, SandboxPool
from sandbox.result import Result

__all__ = ["DEFAULT_PRELOAD", "Result", "SandboxPool"]
