"""A seccomp-confined Python sandbox with a warm fork server, for model-written code during RL.

    from nanotorl.sandbox import SandboxPool, Result
    with SandboxPool(workers=4) as pool:
        print(pool.run("print(2**100)").stdout)

Files: pool.py (the API), result.py (what a run gives back), server.py (the fork server), child.py
(confinement of one run), isolation.py (namespaces, identities, pids cgroup, imports), policy.py (the
seccomp allowlist and its BPF compiler), syscalls.py (syscall numbers), protocol.py (the framing
between pool and server), leftovers.py (what a killed pool left, removed by the next one). ``python -m
nanotorl.sandbox CODE`` tries code by hand; docs/sandbox.md is the threat model.
"""
from nanotorl.sandbox.pool import DEFAULT_PRELOAD, SandboxPool
from nanotorl.sandbox.result import Result

__all__ = ["DEFAULT_PRELOAD", "Result", "SandboxPool"]
