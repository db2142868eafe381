"""Compile the policy table (sandbox/policy.py) to classic-BPF seccomp programs, and install one.

Why ctypes and not libseccomp: the programs are a few hundred BPF instructions that this file
builds and that tests/test_sandbox.py reads back with a 20-line interpreter; libseccomp would add a
C library (and a Python binding PyPI does not ship as a wheel) to every training machine, for no
gain in what the filter can express. The price is the syscall-number table (sandbox/syscalls.py),
which a test checks against libseccomp's own table where it is installed.

Each program (``seccomp_data`` = {int nr; u32 arch; u64 ip; u64 args[6]}, little endian):

    A = arch;  A != native arch          -> KILL_PROCESS   (no i386 / arm32 entry into the kernel)
    A = nr;    A >= 0x40000000 (x86_64)  -> KILL_PROCESS   (no x32 ABI)
    for each row (syscalls, rule) of the program:
        A in syscalls -> rule(args) ? ALLOW : ERRNO(row's errno)
    default: ERRNO(EPERM) for the SERVER program (an allowlist), ALLOW for the RUN program

A rule's alternatives compile to a chain of tests; a test that fails jumps to the next alternative,
the last one's failure to the row's ERRNO.
"""
import ctypes
import errno
import platform

from sandbox.policy import ALLOW, ERRNO, NEG_SELF, SELF, SERVER, Arg, When, rules
from sandbox.syscalls import NUMBERS

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
LD_ABS, AND, JEQ, JGE, JA, RET = 0x20, 0x54, 0x15, 0x35, 0x05, 0x06  # BPF_{LD|W|ABS, ALU|AND|K, JMP|..|K, RET|K}
ARGS_OFFSET = 16  # offsetof(struct seccomp_data, args)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def _test(arg: Arg, ok: str, fail: str) -> list:
    """Instructions that go on at label ``ok`` when ``arg`` holds and jump to label ``fail`` otherwise."""
    lo = ARGS_OFFSET + 8 * arg.i
    if arg.null:
        test = [(LD_ABS, 0, 0, lo), (JEQ, 0, fail, 0), (LD_ABS, 0, 0, lo + 4), (JEQ, 0, fail, 0)]
    elif arg.one_of:
        *first, last = arg.one_of
        test = [(LD_ABS, 0, 0, lo)] + [(JEQ, ok, 0, v) for v in first] + [(JEQ, 0, fail, last)]
    else:
        test = [(LD_ABS, 0, 0, lo), (AND, 0, 0, arg.mask), (JEQ, 0, fail, arg.value)]
    return test + [("label", ok)]


def _rule_block(rule, err: int) -> list:
    """The instructions of one row's rule (with labels): RET ALLOW when it holds, else RET ERRNO(err)."""
    if rule == ALLOW:
        return [(RET, 0, 0, RET_ALLOW)]
    if not isinstance(rule, When):
        return [(RET, 0, 0, RET_ERRNO | err)]
    block = []
    for n, alternative in enumerate(rule.alternatives):
        fail = f"alternative {n + 1}" if n + 1 < len(rule.alternatives) else "deny"
        for i, arg in enumerate(alternative):
            block += _test(arg, f"holds {n}.{i}", fail)
        block += [(JA, 0, 0, "allow"), ("label", fail)]
    return block + [(RET, 0, 0, RET_ERRNO | err), ("label", "allow"), (RET, 0, 0, RET_ALLOW)]


def _resolve(block: list) -> list:
    """Drop the labels and turn jumps to them into relative offsets."""
    where, out = {}, []
    for insn in block:
        if insn[0] == "label":
            where[insn[1]] = len(out)
        else:
            out.append(insn)
    resolved = []
    for i, (code, jt, jf, k) in enumerate(out):
        jt, jf = (where[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        if code == JA and isinstance(k, str):
            k = where[k] - i - 1
        assert 0 <= jt < 256 and 0 <= jf < 256, "a row's rule is too long for an 8-bit jump"
        resolved.append((code, jt, jf, k))
    return resolved


def compile_policy(scope: str, arch: str) -> list:
    """The ``scope`` (SERVER or RUN) program for ``arch``, as (code, jt, jf, k) tuples; ``k`` may still
    be ``SELF`` or ``NEG_SELF`` in the RUN program."""
    if arch not in AUDIT_ARCH:
        raise RuntimeError(f"seccomp policy: expected an x86_64 or aarch64 machine, found {arch!r}; "
                           "the sandbox has no syscall table for it")
    column = 0 if arch == "x86_64" else 1
    prog = [(LD_ABS, 0, 0, 4), (JEQ, 1, 0, AUDIT_ARCH[arch]), (RET, 0, 0, RET_KILL_PROCESS), (LD_ABS, 0, 0, 0)]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, X32_SYSCALL_BIT), (RET, 0, 0, RET_KILL_PROCESS)]
    for names, rule in rules(scope):
        numbers = [NUMBERS[name][column] for name in names.split()]
        numbers = [nr for nr in numbers if nr is not None]  # a syscall the architecture lacks cannot be called
        block = _resolve(_rule_block(rule, ERRNO.get(rule, errno.EPERM)))
        if scope == SERVER and any(k in (SELF, NEG_SELF) for *_, k in block):
            raise ValueError(f"{names}: the SERVER program cannot test a run's own pid; allow it in the server column")
        # nr == any of the row's numbers -> the row's block; otherwise on to the next row
        prog += [(JEQ, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]
        prog += [(JA, 0, 0, len(block)), *block]
    default = RET_ERRNO | errno.EPERM if scope == SERVER else RET_ALLOW
    return prog + [(RET, 0, 0, default)]


class Filter:
    """The ``scope`` program of the policy compiled for this machine, ready to be installed."""

    def __init__(self, scope: str, arch: str | None = None):
        insns = compile_policy(scope, arch or platform.machine())
        self.array = (SockFilter * len(insns))(*[(c, jt, jf, 0 if isinstance(k, str) else k)
                                                  for c, jt, jf, k in insns])
        self.self_slots = [(i, k) for i, (*_, k) in enumerate(insns) if k in (SELF, NEG_SELF)]
        self.fprog = SockFprog(len(insns), self.array)
        self.prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in every child
        self.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

    def install(self, pid: int) -> None:
        """Confine the calling process (and every child it forks later) for good; ``pid`` is its pid.
        Raise OSError if the kernel refuses. Call it while the process has a single thread."""
        for i, k in self.self_slots:
            self.array[i].k = pid if k == SELF else -pid & 0xFFFFFFFF
        for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                     (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self.fprog), 0, 0)):
            if self.prctl(*args) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"prctl({args[0]}) failed: {errno.errorcode.get(e, e)}; this kernel cannot seccomp")

