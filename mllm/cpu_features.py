"""What the CPU computes in hardware, read once from the OS, for the choices that depend on it.

One place asks, so that no module assumes a CPU family: `mllm.int4_decode` keeps its copy of the weights
for wide products in bfloat16 only where bfloat16 products run in hardware (AVX512-BF16 or AMX on x86, the
BF16 extension on Arm); elsewhere bfloat16 is emulated (a 63-token prompt took 783 ms against 190 in
float32 on an AVX2-only EPYC) and the copy is float32. The benchmarks print the same facts at their top.
"""

from __future__ import annotations

import platform
from functools import lru_cache

# The flags that decide which kernels are fast, as /proc/cpuinfo names them (x86 "flags", Arm "Features").
REPORTED = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "bf16", "asimd")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU; ("<machine>", {}) where the OS does not say (no /proc)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    name, flags = platform.machine(), frozenset()
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name", "CPU part") and name == platform.machine():
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return name, flags


def bf16_in_hardware(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 products run in hardware on this CPU (or for `flags`)."""
    flags = cpu_info()[1] if flags is None else flags
    return any(flag in flags for flag in BF16_FLAGS)


def describe() -> str:
    """'CPU: <name>; avx2 yes, avx512f no, ...': the first line of every benchmark."""
    name, flags = cpu_info()
    return f"CPU: {name}; " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in REPORTED)
