"""The OpenVINO backend (worker.engine.openvino_backend): the bundle's FP32 graph compiled by the
``openvino`` runtime. Skipped where the ``openvino`` extra is not installed (``make test``
installs it with the dev extra). No timings here."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from worker.engine import quality
from worker.engine.bundle import Bundle, serving_fingerprint
from worker.engine.cpu import CpuInfo, read_cpu
from worker.engine.embedder import Embedder
from worker.engine.errors import EngineError
from worker.engine.openvino_backend import openvino_precision
from worker.engine.recommend import MAX_BATCH_DRIFT, runnable_variants

pytest.importorskip(
    "openvino", reason="the openvino extra is not installed (pip install 'embedfleet[openvino]')"
)


@pytest.fixture(scope="module")
def openvino_embedder(bundle: Bundle) -> Embedder:
    return Embedder.from_bundle(bundle.path, variant="openvino", intra_op_threads=2, parallel_calls=2)


def test_the_precision_follows_the_cpu() -> None:
    assert openvino_precision(CpuInfo("x", 2, frozenset({"avx2", "avx512f", "avx512_bf16"}))) == "bf16"
    assert openvino_precision(CpuInfo("x", 2, frozenset({"avx2", "amx_bf16"}))) == "bf16"
    assert openvino_precision(CpuInfo("x", 2, frozenset({"avx2", "avx512f", "avx512_vnni"}))) == "f32"


def test_its_vectors_match_the_reference_and_not_the_batch(
    openvino_embedder: Embedder, shared_dir: Path
) -> None:
    reference = quality.read_reference(shared_dir / "reference" / "all-MiniLM-L6-v2")
    vectors = openvino_embedder.embed(reference.texts).vectors
    cosines = quality.row_cosines(vectors, reference.vectors)
    assert cosines.min() >= 0.999 and cosines.mean() >= 0.9999, (cosines.min(), cosines.mean())
    sample = list(reference.texts[:64])
    alone = np.stack([openvino_embedder.embed([text]).vectors[0] for text in sample])
    drift = 1.0 - quality.row_cosines(openvino_embedder.embed(sample, batch_size=32).vectors, alone).min()
    assert drift <= MAX_BATCH_DRIFT


def test_it_has_a_fingerprint_of_its_own_naming_the_precision(
    openvino_embedder: Embedder, bundle: Bundle
) -> None:
    precision = openvino_precision(read_cpu())
    assert openvino_embedder.serving_variant == f"openvino-{precision}"
    assert precision in openvino_embedder.kernel
    others = {
        serving_fingerprint(bundle.manifest, v) for v in ("fp32", "int8", "openvino-bf16", "openvino-f32")
    }
    assert len(others) == 4
    assert openvino_embedder.model_fingerprint == serving_fingerprint(
        bundle.manifest, f"openvino-{precision}"
    )


def test_calls_side_by_side_give_what_calls_in_turn_give(
    openvino_embedder: Embedder, shared_dir: Path
) -> None:
    texts = quality.read_jsonl_strings(shared_dir / "corpus" / "queries.jsonl")[:200]
    halves = [texts[:100], texts[100:]]
    in_turn = [openvino_embedder.embed(half).vectors for half in halves]
    side_by_side: list[np.ndarray] = [np.zeros(0)] * 2

    def embed(index: int) -> None:
        side_by_side[index] = openvino_embedder.embed(halves[index]).vectors

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for alone, together in zip(in_turn, side_by_side, strict=True):
        np.testing.assert_allclose(together, alone, atol=1e-6)


def test_it_runs_on_the_cpu_only(bundle: Bundle) -> None:
    with pytest.raises(EngineError, match="runs on the CPU"):
        Embedder.from_bundle(bundle.path, variant="openvino", device="cuda")


def test_recommend_measures_it_where_it_is_installed() -> None:
    assert ("openvino", "cpu") in runnable_variants(["fp32", "int8"], cuda=False)
    assert ("openvino", "cpu") not in runnable_variants(["fp32", "int8"], cuda=False, openvino=False)
    assert ("openvino", "cpu") not in runnable_variants(["int8"], cuda=False)  # it compiles the FP32 file
