"""Which variant to serve on this machine: each variant the bundle has and this machine can run is
measured (texts/s on queries and on docs, its vectors against the reference, and how much one
text's vector changes between a batch and a call of its own); the fastest one that meets the
quality floors is recommended (`embedfleet model recommend`).

The floors are the fleet's: every reference text at cosine >= 0.99 to sentence-transformers, a
mean >= 0.995, and batch drift <= 1e-5 (a content-hash cache serves one text's vector to every
later request, so the vector must not depend on the batch it was computed in).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from worker.engine.embedder import CUDA_PROVIDER, Embedder
from worker.engine.openvino_backend import OPENVINO_VARIANT, openvino_available
from worker.engine.quality import Reference, row_cosines

MIN_COSINE = 0.99
MEAN_COSINE = 0.995
MAX_BATCH_DRIFT = 1e-5
Workload = Literal["queries", "docs"]  # what the ranking favours


def meets_floors(min_cosine: float, mean_cosine: float, batch_drift: float) -> bool:
    """The fleet's floors for any variant's vectors (see the module docstring)."""
    return min_cosine >= MIN_COSINE and mean_cosine >= MEAN_COSINE and batch_drift <= MAX_BATCH_DRIFT


@dataclass(frozen=True, slots=True)
class VariantReport:
    variant: str
    device: str
    queries_per_s: float
    docs_per_s: float
    min_cosine: float  # against the reference vectors
    mean_cosine: float
    batch_drift: float  # 1 - the lowest cosine between a text's batched and single vectors
    fingerprint: str
    kernel: str = ""  # what ran: the variant, or the int8 weights' GEMM kernel on this CPU

    @property
    def meets_floors(self) -> bool:
        return meets_floors(self.min_cosine, self.mean_cosine, self.batch_drift)

    def speed(self, workload: Workload) -> float:
        return self.docs_per_s if workload == "docs" else self.queries_per_s


def runnable_variants(
    variants: Sequence[str], cuda: bool | None = None, openvino: bool | None = None
) -> list[tuple[str, str]]:
    """(variant, device) pairs this machine can run: every CPU variant but fp16 (ONNX Runtime's
    CPU kernels run FP16 graphs slowly, through casts), the FP32 graph through OpenVINO when the
    runtime is installed, and fp16 on CUDA when it is there."""
    has_cuda = CUDA_PROVIDER in ort.get_available_providers() if cuda is None else cuda
    pairs = [(variant, "cpu") for variant in sorted(variants) if variant != "fp16"]
    if "fp32" in variants and (openvino_available() if openvino is None else openvino):
        pairs.append((OPENVINO_VARIANT, "cpu"))
    if has_cuda and "fp16" in variants:
        pairs.append(("fp16", "cuda"))
    return pairs


def measure_variant(
    bundle: Path,
    variant: str,
    device: str,
    reference: Reference,
    queries: Sequence[str],
    docs: Sequence[str],
    *,
    threads: int,
) -> VariantReport:
    embedder = Embedder.from_bundle(bundle, variant=variant, device=device, intra_op_threads=threads)  # type: ignore[arg-type]
    ours = embedder.embed(reference.texts).vectors
    cosines = row_cosines(ours, reference.vectors)
    sample = list(reference.texts[:64])
    single = np.stack([embedder.embed([text]).vectors[0] for text in sample])
    drift = 1.0 - float(row_cosines(embedder.embed(sample).vectors, single).min())
    embedder.embed(list(queries[:32]))  # warm-up: the first calls allocate
    return VariantReport(
        variant=variant,
        device=device,
        queries_per_s=_texts_per_s(embedder.embed, queries),
        docs_per_s=_texts_per_s(embedder.embed, docs),
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        batch_drift=max(0.0, drift),
        fingerprint=embedder.model_fingerprint,
        kernel=embedder.kernel,
    )


def recommend(reports: Sequence[VariantReport], workload: Workload = "queries") -> VariantReport | None:
    """The fastest report that meets the floors (None when none does)."""
    passing = [report for report in reports if report.meets_floors]
    return max(passing, key=lambda report: report.speed(workload), default=None)


def _texts_per_s(embed: Callable[[list[str]], object], texts: Sequence[str]) -> float:
    started = time.perf_counter()
    embed(list(texts))
    return len(texts) / max(time.perf_counter() - started, 1e-9)
