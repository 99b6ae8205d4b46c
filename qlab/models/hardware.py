"""Deployment-target catalog (``assets/hardware.json``) and detection of the machine qlab runs on."""

from __future__ import annotations

import difflib
import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import psutil

from qlab.core.errors import QlabError

CATALOG_PATH = Path(__file__).resolve().parents[2] / "assets" / "hardware.json"
THIS_MACHINE_ID = "this-machine"

# The vocabulary of `native_formats`, in display order (widest first).
NATIVE_FORMATS: tuple[str, ...] = (
    "fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "nf4", "fp4_e2m1",
)
TFLOPS_DTYPES: frozenset[str] = frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4", "fp4"})
HARDWARE_KINDS: frozenset[str] = frozenset({"gpu", "cpu", "soc"})

# Flags that decide which quantized kernels a CPU can run; names as Linux /proc/cpuinfo spells them
# (x86 `flags`, Arm `Features`), so one set serves both.
FLAGS_OF_INTEREST: frozenset[str] = frozenset({
    "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve",
})
_INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
_FP16_MATH_FLAGS = frozenset({"avx512_fp16", "asimdhp"})
# llama.cpp's Q4 weight-only kernels are written for these SIMD baselines; below them they run scalar.
_INT4_KERNEL_FLAGS = frozenset({"avx2", "asimd"})

# macOS reports features through sysctl under other names; map them to the Linux spelling.
_MACOS_ARM_FEATURES = {
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.AdvSIMD": "asimd",
}
_MACOS_X86_RENAMES = {"avx1.0": "avx", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16"}


@dataclass(frozen=True)
class Source:
    """Where a catalog figure comes from; ``url`` is None for internal references."""

    title: str
    url: str | None = None


@dataclass(frozen=True)
class Host:
    """What detection read about the machine qlab runs on."""

    cpu_model: str
    physical_cores: int
    logical_cores: int
    usable_cores: int
    ram_bytes: int
    cpu_flags: frozenset[str]
    cpu_native_formats: tuple[str, ...]
    cuda_device_name: str | None = None
    cuda_memory_bytes: int | None = None
    cuda_capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class Hardware:
    """A deployment target: a catalog entry, or this machine when ``is_detected``."""

    id: str
    name: str
    kind: Literal["gpu", "cpu", "soc"]
    vendor: str
    arch: str
    memory_bytes: int
    bandwidth_bytes_per_s: int | None
    # Dense peak per dtype (TFLOPS or TOPS), None where unknown; kept out of the hash as mappings have none.
    tflops: Mapping[str, float] | None = field(hash=False)
    native_formats: tuple[str, ...]
    notes: str
    sources: tuple[Source, ...]
    is_detected: bool = False
    host: Host | None = None


def catalog() -> list[Hardware]:
    """All catalog entries from ``assets/hardware.json``, in file order (read once per process)."""
    return list(_load_catalog())


def get(hardware_id: str) -> Hardware:
    """The catalog entry with this id (case-insensitive), or the detected machine for ``"this-machine"``."""
    wanted = hardware_id.strip().lower()
    if wanted == THIS_MACHINE_ID:
        return detect_this_machine()
    by_id = {hw.id: hw for hw in _load_catalog()}
    if wanted in by_id:
        return by_id[wanted]
    close = difflib.get_close_matches(wanted, by_id, n=3, cutoff=0.4)
    suggestions = close or list(by_id)[:5]
    raise QlabError(
        f"Unknown hardware id {hardware_id!r}; use one of {', '.join(suggestions)}, "
        f"'{THIS_MACHINE_ID}', or another id from assets/hardware.json."
    )


def cpu_flags() -> frozenset[str]:
    """Every instruction-set flag the OS reports for this CPU, spelled as Linux does; empty if unreadable."""
    if sys.platform.startswith("linux"):
        return _linux_cpu_flags(Path("/proc/cpuinfo"))
    if sys.platform == "darwin":
        return _macos_cpu_flags()
    # Windows exposes no flag list without extra packages; report nothing rather than guess.
    return frozenset()


def cpu_native_formats(flags: frozenset[str]) -> tuple[str, ...]:
    """Formats a CPU with these flags runs natively, by the catalog's rules (int8 needs a dot-product op)."""
    formats = {"fp32"}
    if flags & _FP16_MATH_FLAGS:
        formats.add("fp16")
    if flags & _BF16_FLAGS:
        formats.add("bf16")
    if flags & _INT8_DOT_FLAGS:
        formats.add("int8")
    if flags & _INT4_KERNEL_FLAGS:
        formats.add("int4")
    return _ordered(formats)


def cuda_native_formats(capability: tuple[int, int]) -> tuple[str, ...]:
    """Formats an NVIDIA GPU of this compute capability runs natively, by the catalog's rules."""
    formats = {"fp32", "fp16"}
    if capability >= (7, 5):
        # Turing tensor cores add int8; int4/nf4 weight-only kernels (AWQ/GPTQ, bitsandbytes) start here.
        formats |= {"int8", "int4", "nf4"}
    if capability >= (8, 0):
        formats.add("bf16")
    if capability >= (8, 9):
        formats |= {"fp8_e4m3", "fp8_e5m2"}
    if capability >= (10, 0):
        formats.add("fp4_e2m1")
    return _ordered(formats)


@functools.lru_cache(maxsize=1)
def detect_this_machine() -> Hardware:
    """This machine as ``Hardware`` (id ``"this-machine"``), read rather than assumed.

    Read once per process; bandwidth and TFLOPS are None because nothing here measures them.
    """
    flags = cpu_flags()
    interesting = flags & FLAGS_OF_INTEREST
    cpu_formats = cpu_native_formats(interesting)
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    cuda = _cuda_device()
    host = Host(
        cpu_model=_cpu_model(),
        physical_cores=physical,
        logical_cores=logical,
        usable_cores=_usable_cores(logical),
        ram_bytes=_ram_bytes(),
        cpu_flags=interesting,
        cpu_native_formats=cpu_formats,
        cuda_device_name=cuda[0] if cuda else None,
        cuda_memory_bytes=cuda[1] if cuda else None,
        cuda_capability=cuda[2] if cuda else None,
    )
    flag_text = ", ".join(sorted(interesting)) or "none readable"
    if cuda:
        name, memory_bytes, capability = cuda
        return Hardware(
            id=THIS_MACHINE_ID,
            name=f"{name} (this machine)",
            kind="gpu",
            vendor="NVIDIA",
            arch=f"CUDA sm_{capability[0]}{capability[1]}",
            memory_bytes=memory_bytes,
            bandwidth_bytes_per_s=None,
            tflops=None,
            native_formats=cuda_native_formats(capability),
            notes=(
                f"Detected: formats from CUDA compute capability {capability[0]}.{capability[1]}; "
                f"the CPU ({host.cpu_model}, flags: {flag_text}) runs {', '.join(cpu_formats)}."
            ),
            sources=(Source("torch.cuda device properties"), Source("psutil"), Source("OS CPU flags")),
            is_detected=True,
            host=host,
        )
    is_apple_soc = sys.platform == "darwin" and platform.machine() == "arm64"
    return Hardware(
        id=THIS_MACHINE_ID,
        name=f"{host.cpu_model} (this machine)",
        kind="soc" if is_apple_soc else "cpu",
        vendor=_cpu_vendor(),
        arch=platform.machine() or "unknown",
        memory_bytes=host.ram_bytes,
        bandwidth_bytes_per_s=None,
        tflops=None,
        native_formats=cpu_formats,
        notes=f"Detected: formats from CPU flags ({flag_text}); int8 needs VNNI, AMX-INT8 or NEON dotprod.",
        sources=(Source("psutil"), Source("OS CPU flags")),
        is_detected=True,
        host=host,
    )


def _ordered(formats: set[str]) -> tuple[str, ...]:
    return tuple(name for name in NATIVE_FORMATS if name in formats)


@functools.lru_cache(maxsize=1)
def _load_catalog() -> tuple[Hardware, ...]:
    try:
        raw = json.loads(CATALOG_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise QlabError(f"Hardware catalog {CATALOG_PATH} is missing; restore assets/hardware.json.") from exc
    except json.JSONDecodeError as exc:
        raise QlabError(f"Hardware catalog {CATALOG_PATH} is not valid JSON ({exc}); fix the file.") from exc
    entries = tuple(_parse_entry(entry) for entry in raw["hardware"])
    ids = [hw.id for hw in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise QlabError(f"Hardware ids {duplicates} repeat in assets/hardware.json; make each id unique.")
    return entries


def _parse_entry(entry: dict[str, Any]) -> Hardware:
    hw_id = str(entry.get("id", "?"))

    def bad(what: str) -> QlabError:
        return QlabError(f"Hardware entry {hw_id!r} in assets/hardware.json {what}; fix that entry.")

    required = ("id", "name", "kind", "vendor", "arch", "memory_bytes", "bandwidth_bytes_per_s", "tflops",
                "native_formats", "notes", "sources")
    missing = [key for key in required if key not in entry]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    if hw_id != hw_id.lower() or hw_id == THIS_MACHINE_ID:
        raise bad(f"needs a lowercase id other than {THIS_MACHINE_ID!r}")
    if entry["kind"] not in HARDWARE_KINDS:
        raise bad(f"has kind {entry['kind']!r}, not one of {sorted(HARDWARE_KINDS)}")
    for key in ("memory_bytes", "bandwidth_bytes_per_s"):
        value = entry[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(f"has {key}={value!r}, which must be a positive integer")
    unknown_formats = set(entry["native_formats"]) - set(NATIVE_FORMATS)
    if unknown_formats:
        raise bad(f"lists unknown formats {sorted(unknown_formats)}")
    tflops = entry["tflops"]
    unknown_dtypes = set(tflops) - TFLOPS_DTYPES
    if unknown_dtypes or any(not isinstance(v, int | float) or v <= 0 for v in tflops.values()):
        raise bad(f"has tflops {tflops!r}; use positive numbers keyed by {sorted(TFLOPS_DTYPES)}")
    if not entry["sources"]:
        raise bad("cites no sources")
    return Hardware(
        id=hw_id,
        name=entry["name"],
        kind=entry["kind"],
        vendor=entry["vendor"],
        arch=entry["arch"],
        memory_bytes=entry["memory_bytes"],
        bandwidth_bytes_per_s=entry["bandwidth_bytes_per_s"],
        tflops=MappingProxyType({dtype: float(v) for dtype, v in tflops.items()}),
        native_formats=_ordered(set(entry["native_formats"])),
        notes=entry["notes"],
        sources=tuple(Source(s["title"], s.get("url")) for s in entry["sources"]),
    )


def _linux_cpu_flags(cpuinfo: Path) -> frozenset[str]:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    per_cpu = [
        frozenset(line.split(":", 1)[1].split())
        for line in text.splitlines()
        if line.split(":", 1)[0].strip() in ("flags", "Features")
    ]
    # A thread may land on any core, so only flags every core reports are usable.
    return frozenset.intersection(*per_cpu) if per_cpu else frozenset()


def _sysctl(*names: str) -> str:
    try:
        done = subprocess.run(["sysctl", *names], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def _macos_cpu_flags() -> frozenset[str]:
    flags: set[str] = set()
    for line in _sysctl("hw.optional").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _MACOS_ARM_FEATURES and value.strip() == "1":
            flags.add(_MACOS_ARM_FEATURES[key.strip()])
    for line in _sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features").splitlines():
        for word in line.partition(":")[2].lower().split():
            flags.add(_MACOS_X86_RENAMES.get(word, word))
    return frozenset(flags)


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name and value.strip():
            return value.strip()
    return None


def _cpu_model() -> str:
    if sys.platform.startswith("linux"):
        # Arm kernels often have no "model name"; the board model is the next best name.
        model = _cpuinfo_field("model name") or _cpuinfo_field("Model") or _cpuinfo_field("Hardware")
        if model:
            return model
    if sys.platform == "darwin":
        brand = _sysctl("machdep.cpu.brand_string").partition(":")[2].strip()
        if brand:
            return brand
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_vendor() -> str:
    vendor_id = _cpuinfo_field("vendor_id") if sys.platform.startswith("linux") else None
    names = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}
    if vendor_id:
        return names.get(vendor_id, vendor_id)
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "Apple"
    return "unknown"


def _usable_cores(logical: int) -> int:
    # Containers and taskset pin a process to fewer cores than the host has; thread counts should follow.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return logical


def _ram_bytes() -> int:
    total = psutil.virtual_memory().total
    # A container's cgroup v2 memory limit, when below physical RAM, is the real ceiling for fit verdicts.
    limit_file = Path("/sys/fs/cgroup/memory.max")
    try:
        limit = limit_file.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _cuda_device() -> tuple[str, int, tuple[int, int]] | None:
    # Imported here, not at the top: torch takes seconds to import and catalog lookups need none of it.
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory), (props.major, props.minor)
