"""Quality measures between two sets of embeddings of the same texts (INT8 vs FP32, FP32 vs a
reference), and the corpus/reference readers they are measured on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# Targets of INT8 against FP32 on the first 2000 distinct corpus queries, and FP32 against the
# sentence-transformers reference vectors.
INT8_MIN_COSINE = 0.97
INT8_MEAN_COSINE = 0.99
INT8_TOP10_OVERLAP = 0.88
REFERENCE_MIN_COSINE = 0.99999


@dataclass(frozen=True, slots=True)
class Agreement:
    min_cosine: float
    mean_cosine: float
    top10_overlap: float
    worst_index: int

    def meets_int8_targets(self) -> bool:
        return (
            self.min_cosine >= INT8_MIN_COSINE
            and self.mean_cosine >= INT8_MEAN_COSINE
            and self.top10_overlap >= INT8_TOP10_OVERLAP
        )


def row_cosines(a: FloatArray, b: FloatArray) -> npt.NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dots = np.einsum("ij,ij->i", a64, b64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    result: npt.NDArray[np.float64] = dots / np.maximum(norms, 1e-30)
    return result


def nearest_neighbours(vectors: FloatArray, k: int) -> npt.NDArray[np.intp]:
    """Each row's k nearest other rows by cosine (rows are expected L2-normalised)."""
    similarity = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    np.fill_diagonal(similarity, -np.inf)
    result: npt.NDArray[np.intp] = np.argpartition(-similarity, k, axis=1)[:, :k]
    return result


def top_k_overlap(candidate: FloatArray, reference: FloatArray, k: int = 10) -> float:
    """Mean fraction of each text's k nearest neighbours that both embeddings agree on."""
    ours, theirs = nearest_neighbours(candidate, k), nearest_neighbours(reference, k)
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ours, theirs, strict=True)]
    return float(np.mean(shared)) / k


def agreement(candidate: FloatArray, reference: FloatArray, k: int = 10) -> Agreement:
    cosines = row_cosines(candidate, reference)
    overlap = top_k_overlap(candidate, reference, k) if len(candidate) > k else 1.0
    return Agreement(float(cosines.min()), float(cosines.mean()), overlap, int(np.argmin(cosines)))


def read_jsonl_strings(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def first_distinct(texts: list[str], limit: int) -> list[str]:
    seen: dict[str, None] = {}
    for text in texts:
        seen.setdefault(text, None)
        if len(seen) == limit:
            break
    return list(seen)


@dataclass(frozen=True, slots=True)
class Reference:
    texts: list[str]
    vectors: FloatArray


def read_reference(directory: Path) -> Reference:
    """texts.jsonl (one JSON string per line) and vectors.npy, row for row."""
    texts = read_jsonl_strings(directory / "texts.jsonl")
    vectors = np.load(directory / "vectors.npy").astype(np.float32)
    if len(texts) != len(vectors):
        raise ValueError(f"{directory}: {len(texts)} texts but {len(vectors)} vectors")
    return Reference(texts, vectors)
