"""The CPU this process runs on, as ONNX Runtime's INT8 kernels (MLAS) see it, and which encoding
of the INT8 weights is both exact and fastest on it.

The INT8 variant's weights are one integer grid (symmetric int8 per output column) stored two
ways in a bundle:

* ``u8``: uint8 around a zero point of 128, so each GEMM is u8 x u8. MLAS widens both operands to
  int16 before multiplying: exact on every x86 CPU, but it never uses the VNNI instruction.
* ``s8``: the int8 values themselves, so each GEMM is u8 x s8. With AVX-512 VNNI, AVX-VNNI or AMX
  MLAS runs it with ``vpdpbusd`` (or AMX tiles), which accumulate in int32: exact, and measured
  2.4x the u8 x u8 GEMM on an AVX-512 VNNI EPYC (``bench/roofline.py``). Without them it runs on
  ``vpmaddubsw``, which adds adjacent u8 x s8 products with int16 saturation (2 x 255 x 127
  overflows it): there the vectors would differ, so ``s8`` is never used on such a CPU.

Both encodings compute the same integer sums, so they give the same vectors (checked by
tests/engine/test_int8_weights.py) and share the variant's serving fingerprint: a fleet that mixes
CPUs with and without VNNI serves one fingerprint and shares one cache.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from worker.engine.errors import EngineError

Int8Weights = Literal["u8", "s8"]
INT8_WEIGHT_SETTINGS: tuple[str, ...] = ("auto", "u8", "s8")

# Instruction sets under which MLAS's u8 x s8 GEMM accumulates without saturation.
EXACT_S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# What the benches report of a CPU.
REPORTED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)


class Int8WeightsError(EngineError):
    """The INT8 weights asked for cannot run exactly on this CPU."""


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str
    cores: int
    flags: frozenset[str]

    @property
    def reported_flags(self) -> list[str]:
        return [flag for flag in REPORTED_FLAGS if flag in self.flags]

    @property
    def exact_s8_gemm(self) -> bool:
        """Whether u8 x s8 GEMMs accumulate without saturation here (VNNI or AMX)."""
        return any(flag in self.flags for flag in EXACT_S8_FLAGS)

    def int8_kernel(self, weights: Int8Weights) -> str:
        """The MLAS INT8 GEMM kernel that ``weights`` run on here, in words."""
        if weights == "u8":
            return "u8 x u8 (operands widened to int16: exact on any x86 CPU, no VNNI)"
        if "amx_int8" in self.flags:
            return "u8 x s8 on AMX tiles"
        if "avx512_vnni" in self.flags:
            return "u8 x s8 on AVX-512 VNNI (vpdpbusd)"
        if "avx_vnni" in self.flags:
            return "u8 x s8 on AVX-VNNI (vpdpbusd, 256-bit)"
        return "u8 x s8 on vpmaddubsw (int16 saturation: not exact)"


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's CPU. Where ``cpuinfo`` cannot be read (not Linux), no flags are known, so
    INT8 uses the u8 weights, which are exact everywhere."""
    model, flags = "", frozenset[str]()
    try:
        with cpuinfo.open() as info:
            for line in info:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return CpuInfo(model or platform.processor() or "unknown", os.cpu_count() or 1, flags)


def choose_int8_weights(setting: str, cpu: CpuInfo, available: frozenset[str]) -> Int8Weights:
    """The weights to load for the INT8 variant: ``auto`` takes s8 where it is exact and the bundle
    has it, u8 otherwise; ``s8`` on a CPU where it would saturate is refused."""
    if setting not in INT8_WEIGHT_SETTINGS:
        raise Int8WeightsError(f"INT8 weights {setting!r}: choose one of {', '.join(INT8_WEIGHT_SETTINGS)}")
    if setting == "s8":
        if not cpu.exact_s8_gemm:
            raise Int8WeightsError(
                f"INT8 weights s8 need AVX-512 VNNI, AVX-VNNI or AMX, which this CPU ({cpu.model}) lacks: "
                "its u8 x s8 GEMM saturates, so its vectors would differ from the fleet's. "
                "Use EMBEDFLEET_INT8_WEIGHTS=auto (or u8)"
            )
        if "s8" not in available:
            raise Int8WeightsError(
                "this bundle has no s8 INT8 weights (built before they existed): run "
                "`embedfleet model build` to rebuild it, or use EMBEDFLEET_INT8_WEIGHTS=auto"
            )
        return "s8"
    if setting == "auto" and cpu.exact_s8_gemm and "s8" in available:
        return "s8"
    return "u8"
