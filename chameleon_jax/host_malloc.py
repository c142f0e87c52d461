"""Transparent huge pages for host memory when XLA computes on the CPU.

XLA's CPU runtime allocates each execution's scratch buffer with `malloc` and frees it
when the execution ends. The demo's transformer step needs 362 MB of scratch per
device; glibc serves a block that large with a fresh `mmap`, so every step faults the
whole buffer in again, 4 KB at a time: 185,000 page faults and 0.28 s of kernel time a
step on two cores. With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks the
kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`), so the same buffer
faults in 2 MB at a time: about 1,300 faults a step, and the demo's step takes 381-383
ms instead of 483-487 ms (`python -m eval.bench.train` with the demo's model). The
tokenizer, whose buffers are small, trains about 5% slower with it (281-304 pictures a
second against 307-317); a process gets one setting, and the demo's transformer takes
twice the tokenizer's time.

glibc reads its tunables once, when a process starts, from the GLIBC_TUNABLES
environment variable. The command-line entry points that train, tokenise, run the demo or
benchmark a step call `reexec_with_huge_pages()` under their `__main__` guard, which starts
the same command again with the tunable added when it is missing and would take
effect: Linux with glibc 2.35 or newer, transparent huge pages in `madvise` mode,
JAX computing on the CPU (JAX_PLATFORMS=cpu, or no CUDA, ROCm or TPU plugin
installed), and CHAMELEON_JAX_MALLOC not set to `system`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
_REEXECED = "_CHAMELEON_JAX_MALLOC_REEXEC"


def computes_on_cpu(env: dict[str, str] | None = None) -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = (os.environ if env is None else env).get("JAX_PLATFORMS", "").lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _glibc_supports_hugetlb() -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(x) for x in version.split(".")[:2])
    except (ValueError, OSError, AttributeError, TypeError):
        return False
    return name == "glibc" and (major, minor) >= (2, 35)


def _thp_on_request() -> bool:
    try:
        return "[madvise]" in _THP_MODE.read_text()
    except OSError:
        return False


def with_huge_pages(env: dict[str, str]) -> dict[str, str]:
    """`env` with the tunable last in GLIBC_TUNABLES (any other hugetlb value dropped, other tunables kept)."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    tunables.append(TUNABLE)
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)}


def wanted(env: dict[str, str] | None = None) -> bool:
    """Whether this process should run with the tunable and does not yet."""
    env = os.environ if env is None else env
    if env.get("CHAMELEON_JAX_MALLOC", "").lower() == "system" or env.get(_REEXECED):
        return False
    if TUNABLE in env.get("GLIBC_TUNABLES", "").split(":"):
        return False
    return sys.platform == "linux" and _glibc_supports_hugetlb() and _thp_on_request() and computes_on_cpu(env)


def reexec_with_huge_pages() -> None:
    """Starts this command again with the tunable when it is wanted (see the module docstring).

    Call it first thing under a command's `__main__` guard, never from library code: it replaces
    the running process.
    """
    if not wanted() or not getattr(sys, "orig_argv", None):
        return
    env = {**with_huge_pages(dict(os.environ)), _REEXECED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
