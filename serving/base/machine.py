"""Facts about this machine that benchmark results and run records keep: TensorFlow-free.

The GPUs TensorFlow sees are added by training.env.machine_facts, and only when TensorFlow is loaded.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any


def package_versions(names: tuple[str, ...] = (
    "tensorflow", "tf-keras", "onnx", "tf2onnx", "onnxruntime-gpu", "onnxruntime", "bentoml", "numpy", "pillow",
)) -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out: dict[str, str] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's instruction-set flags (Linux); None where /proc/cpuinfo is not there to say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


# x86 instructions that multiply uint8 by int8 into int32 without onnxruntime's int16 saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_vnni(flags: set[str] | None = None) -> bool | None:
    """Whether this CPU has VNNI/AMX int8 dot products; None where its flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else bool(flags & set(VNNI_FLAGS))


def int8_isa() -> dict[str, Any]:
    """The CPU facts an int8 file's figures depend on (which int8 kernels onnxruntime used)."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "machine": platform.machine(), "vnni": has_vnni(flags),
            "flags": sorted(f for f in (flags or ()) if f in (*VNNI_FLAGS, "avx2", "avx512f", "avx512bw"))}


def machine_facts() -> dict[str, Any]:
    """CPU, cores and memory; cheap, and safe without TensorFlow loaded."""
    facts: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        facts["memory_gb"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return facts
