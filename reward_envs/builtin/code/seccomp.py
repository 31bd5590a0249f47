"""The sandbox's seccomp filter: a classic-BPF program for bwrap's ``--seccomp FD``; stdlib.

bwrap sets ``no_new_privs`` and loads the program before it execs the sandbox's command, so
every process of the sandbox runs under it (filters are inherited and cannot be removed).
It checks the audit architecture first (a syscall of another ABI, e.g. x86's 32-bit
``int 0x80`` or x32, kills the process: the numbers below would mean other calls there),
then answers ``EPERM`` for the calls in ``DENIED`` and allows everything else.

Why these: ``ptrace``, ``process_vm_readv``/``writev``, ``kcmp`` and ``pidfd_getfd``
reach into other processes of the same uid (the judge, the sandbox's init); ``mount``
and its new API, ``unshare``, ``setns``, ``pivot_root``, ``chroot`` rebuild the view of
the system; ``keyctl``/``add_key``/``request_key``, ``bpf``, ``perf_event_open``,
``userfaultfd``, ``io_uring_*`` (its operations are not seen by seccomp),
``open_by_handle_at`` and the module, kexec, swap, reboot, accounting and quota calls are
kernel attack surface no solution needs.

Only x86_64 and aarch64 are known; elsewhere ``program()`` raises, so the sandbox refuses
to run rather than run without the filter.
"""

from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
"""``platform.machine()`` -> ``AUDIT_ARCH_*`` of ``<linux/audit.h>``."""
DENIED: dict[str, tuple[int, int]] = {
    # name: (x86_64, aarch64), from <asm/unistd_64.h> and <asm-generic/unistd.h>
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "kcmp": (312, 272),
    "pidfd_getfd": (438, 438),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "open_by_handle_at": (304, 265),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "acct": (163, 89),
    "quotactl": (179, 60),
}
X32_SYSCALL_BIT = 0x40000000
"""x86_64: set in the number of an x32-ABI call (which would alias the calls above)."""

# <linux/bpf_common.h>, <linux/seccomp.h>
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JSET_K = 0x05 | 0x40 | 0x00
BPF_RET_K = 0x06 | 0x00
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
OFFSET_NR, OFFSET_ARCH = 0, 4
"""Of ``nr`` and ``arch`` in ``struct seccomp_data``."""


def _insn(code: int, jt: int = 0, jf: int = 0, k: int = 0) -> bytes:
    """One ``struct sock_filter``: u16 code, u8 jt, u8 jf, u32 k (native byte order)."""
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    """The filter for ``machine`` (default: this one), as bwrap's ``--seccomp`` reads it."""
    machine = machine or platform.machine()
    if machine not in AUDIT_ARCH:
        raise ValueError(
            f"no seccomp filter for architecture {machine!r} (known: {', '.join(AUDIT_ARCH)}):"
            " add its syscall numbers to seccomp.DENIED"
        )
    column = list(AUDIT_ARCH).index(machine)
    numbers = sorted({row[column] for row in DENIED.values()})
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    insns = [
        _insn(BPF_LD_W_ABS, k=OFFSET_ARCH),
        _insn(BPF_JEQ_K, jt=1, jf=0, k=AUDIT_ARCH[machine]),
        _insn(BPF_RET_K, k=SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, k=OFFSET_NR),
    ]
    if machine == "x86_64":  # x32 numbers: refused as a whole
        insns += [_insn(BPF_JSET_K, jt=0, jf=1, k=X32_SYSCALL_BIT), _insn(BPF_RET_K, k=deny)]
    for nr in numbers:  # match: fall through to the deny just after, else skip it
        insns += [_insn(BPF_JEQ_K, jt=0, jf=1, k=nr), _insn(BPF_RET_K, k=deny)]
    insns.append(_insn(BPF_RET_K, k=SECCOMP_RET_ALLOW))
    return b"".join(insns)
