"""What the CPU offers for low-precision inference, read from its flags at run time.

bfloat16 matrix units (AMX-BF16, AVX512-BF16) make bfloat16 convolutions several times faster
than float32; int8 dot-product units (AVX512-VNNI / AVX-VNNI, AMX-INT8) do the same for int8.
Without them oneDNN emulates the low precision, slower than float32, so a mode that needs them
falls back. ``MRCNN_PLUGIN_CPUINFO`` names another file in /proc/cpuinfo's format to read
instead (e.g. a copy without the flags, to run the fallbacks on a CPU that has them).
"""

import os
from typing import Optional, Set

__all__ = [
    "BF16_CPU_FLAGS",
    "CPUINFO_ENV",
    "INT8_CPU_FLAGS",
    "cpu_flags",
    "cpu_has_bf16",
    "cpu_has_int8",
    "cpu_model",
    "cpuinfo_path",
    "describe_cpu",
    "has_bf16",
]

CPUINFO_ENV = "MRCNN_PLUGIN_CPUINFO"
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512 / AMX) and Arm names
INT8_CPU_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
_SHOWN = (
    ("AMX-BF16", "amx_bf16"),
    ("AMX-INT8", "amx_int8"),
    ("AVX512-BF16", "avx512_bf16"),
    ("AVX512-VNNI", "avx512_vnni"),
    ("AVX-VNNI", "avx_vnni"),
)


def cpuinfo_path(cpuinfo: Optional[str] = None) -> str:
    """``cpuinfo``, else $MRCNN_PLUGIN_CPUINFO, else /proc/cpuinfo."""
    return cpuinfo or os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo"


def _lines(cpuinfo: Optional[str]):
    try:
        with open(cpuinfo_path(cpuinfo)) as f:
            return f.readlines()
    except OSError:  # not Linux: nothing known, so every low-precision mode falls back
        return []


def cpu_flags(cpuinfo: Optional[str] = None) -> Set[str]:
    """The flags of the first CPU listed (x86 "flags", Arm "Features")."""
    for line in _lines(cpuinfo):
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[-1].split())
    return set()


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    for line in _lines(cpuinfo):
        if line.startswith("model name"):
            return line.split(":", 1)[-1].strip()
    return "unknown CPU"


def cpu_has_int8(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU has int8 dot-product units (VNNI or AMX-INT8)."""
    return bool(INT8_CPU_FLAGS & cpu_flags(cpuinfo))


def describe_cpu(cpuinfo: Optional[str] = None) -> str:
    """E.g. "Intel(R) Xeon(R) Processor, 2 threads; AMX-BF16 yes, AMX-INT8 yes, ..."."""
    import torch

    flags = cpu_flags(cpuinfo)
    features = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in _SHOWN)
    return f"{cpu_model(cpuinfo)}, {torch.get_num_threads()} threads; {features}"


def cpu_has_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU lists a native bfloat16 instruction set among its flags."""
    return bool(BF16_CPU_FLAGS & cpu_flags(cpuinfo))


has_bf16 = cpu_has_bf16
