"""The CPU this process runs on, as ONNX Runtime's INT8 kernels (MLAS) see it, and which encoding
of the INT8 weights is both exact and fastest on it.

The INT8 variant's weights are one integer grid (symmetric int8 per output column) stored two
ways in a bundle:

* ``u8``: uint8 around a zero point of 128, so each GEMM is u8 x u8. MLAS widens both operands to
  int16 before multiplying: exact on every x86 CPU, and the slowest INT8 GEMM on each.
* ``s8``: the int8 values themselves, so each GEMM is u8 x s8, MLAS's fastest INT8 GEMM:
  - with AVX-512 VNNI, AVX-VNNI or AMX it runs on ``vpdpbusd`` (or AMX tiles), which accumulate
    in int32: exact for any int8 weights (2.4x u8 x u8 on an AVX-512 VNNI EPYC);
  - with AVX2 alone (or AVX-512BW without VNNI) it runs on ``vpmaddubsw``, which adds the
    products of two adjacent weights (rows 2j, 2j + 1) in int16 with saturation: exact only if
    no same-sign pair sums past ``VPMADDUBSW_PAIR_LIMIT`` (255 x 128 fits in int16, 255 x 129
    does not). Bundles from builder 5 on are quantized to that bound
    (``worker.engine.quantize.quantize_weight_columns``) and record their largest pair sum in the
    manifest (``int8_s8_pair_sum``); older ones (0 there) run u8 on such CPUs (there the u8 x s8
    GEMM is 1.3x u8 x u8 on an AVX2 EPYC, the engine 1.1-1.2x: ``QUANTIZATION.md``).

Both encodings compute the same integer sums, so they give the same vectors (checked by
tests/engine/test_int8_weights.py, on whatever CPU runs the tests) and share the variant's
serving fingerprint: a fleet that mixes CPUs serves one fingerprint and shares one cache.
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

# Instruction sets under which MLAS's u8 x s8 GEMM accumulates in int32: exact for any weights.
EXACT_S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Where MLAS's u8 x s8 GEMM is vpmaddubsw (int16 pair sums): exact for pair-bounded weights.
PAIRED_S8_FLAGS = ("avx2",)
# The largest |w[2j] + w[2j+1]| (same-sign int8 weights of one column) vpmaddubsw adds exactly
# for any u8 activation: 255 x 128 = 32640 <= 32767 (and >= -32768).
VPMADDUBSW_PAIR_LIMIT = 128
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
        """Whether u8 x s8 GEMMs accumulate in int32 here (VNNI or AMX): exact for any weights."""
        return any(flag in self.flags for flag in EXACT_S8_FLAGS)

    def s8_gemm_exact_for(self, pair_sum: int) -> bool:
        """Whether u8 x s8 GEMMs are exact here on int8 weights whose largest same-sign adjacent
        pair sums to ``pair_sum`` (a manifest's ``int8_s8_pair_sum``; 0: not recorded)."""
        if self.exact_s8_gemm:
            return True
        paired = any(flag in self.flags for flag in PAIRED_S8_FLAGS)
        return paired and 0 < pair_sum <= VPMADDUBSW_PAIR_LIMIT

    def int8_kernel(self, weights: Int8Weights) -> str:
        """The MLAS INT8 GEMM kernel that ``weights`` run on here, in words."""
        if weights == "u8":
            return "u8 x u8 (operands widened to int16: exact on any x86 CPU)"
        if "amx_int8" in self.flags:
            return "u8 x s8 on AMX tiles"
        if "avx512_vnni" in self.flags:
            return "u8 x s8 on AVX-512 VNNI (vpdpbusd)"
        if "avx_vnni" in self.flags:
            return "u8 x s8 on AVX-VNNI (vpdpbusd, 256-bit)"
        if "avx512bw" in self.flags:
            return "u8 x s8 on AVX-512BW vpmaddubsw (int16 pair sums: exact on pair-bounded weights)"
        if "avx2" in self.flags:
            return "u8 x s8 on AVX2 vpmaddubsw (int16 pair sums: exact on pair-bounded weights)"
        return "u8 x s8 (no AVX2: not used)"


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


def choose_int8_weights(
    setting: str, cpu: CpuInfo, available: frozenset[str], pair_sum: int = 0
) -> Int8Weights:
    """The weights to load for the INT8 variant: ``auto`` takes s8 where its GEMM is exact here
    (``CpuInfo.s8_gemm_exact_for``, with the bundle's ``pair_sum``) and the bundle has it, u8
    otherwise; ``s8`` where it would not be exact is refused."""
    if setting not in INT8_WEIGHT_SETTINGS:
        raise Int8WeightsError(f"INT8 weights {setting!r}: choose one of {', '.join(INT8_WEIGHT_SETTINGS)}")
    exact = cpu.s8_gemm_exact_for(pair_sum)
    if setting == "s8":
        if "s8" not in available:
            raise Int8WeightsError(
                "this bundle has no s8 INT8 weights (built before they existed): run "
                "`embedfleet model build` to rebuild it, or use EMBEDFLEET_INT8_WEIGHTS=auto"
            )
        if not exact and any(flag in cpu.flags for flag in PAIRED_S8_FLAGS):
            raise Int8WeightsError(
                f"this CPU ({cpu.model}) runs u8 x s8 GEMMs on vpmaddubsw (no VNNI or AMX), which "
                "is exact only on pair-bounded weights, and this bundle's s8 weights are not (built "
                "before builder 5): its vectors would differ from the fleet's. Run `embedfleet model "
                "build` to rebuild it, or use EMBEDFLEET_INT8_WEIGHTS=auto (or u8)"
            )
        if not exact:
            raise Int8WeightsError(
                f"INT8 weights s8 need AVX2, AVX-512 VNNI, AVX-VNNI or AMX, which this CPU "
                f"({cpu.model}) lacks: use EMBEDFLEET_INT8_WEIGHTS=auto (or u8)"
            )
        return "s8"
    if setting == "auto" and exact and "s8" in available:
        return "s8"
    return "u8"
