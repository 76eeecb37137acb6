"""The embedding engine against its quality targets and contracts (no timings here)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.commands import main as cli_main
from worker.engine import quality, quantize
from worker.engine.bundle import Bundle, BundleError, load_bundle
from worker.engine.cpu import read_cpu
from worker.engine.embedder import (
    Embedder,
    InjectedFault,
    InvalidDimensionsError,
    UnknownTaskError,
    padding_allowed,
    plan_batches,
)

DeriveBundle = Callable[..., Path]


def test_fp32_matches_sentence_transformers_reference(fp32: Embedder, shared_dir: Path) -> None:
    reference = quality.read_reference(shared_dir / "reference" / "all-MiniLM-L6-v2")
    vectors = fp32.embed(reference.texts).vectors
    cosines = quality.row_cosines(vectors, reference.vectors)
    assert len(cosines) == 417
    assert cosines.min() >= quality.REFERENCE_MIN_COSINE


def test_int8_quality_floor(fp32: Embedder, int8: Embedder, shared_dir: Path) -> None:
    texts = quality.first_distinct(quality.read_jsonl_strings(shared_dir / "corpus" / "queries.jsonl"), 2000)
    assert len(texts) == 2000
    result = quality.agreement(int8.embed(texts).vectors, fp32.embed(texts).vectors)
    assert result.mean_cosine >= 0.99
    assert result.min_cosine >= 0.97
    assert result.top10_overlap >= 0.88


# Every reference text agrees with sentence-transformers at >= 0.99 under INT8 (measured floor
# 0.9928, on '?'; the per-tensor scheme had 9 texts below 0.99, the worst at 0.976).
INT8_REFERENCE_FLOOR = 0.99


def test_int8_matches_reference_on_every_text(int8: Embedder, shared_dir: Path) -> None:
    reference = quality.read_reference(shared_dir / "reference" / "all-MiniLM-L6-v2")
    cosines = quality.row_cosines(int8.embed(reference.texts).vectors, reference.vectors)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= INT8_REFERENCE_FLOOR, (reference.texts[worst], cosines.min())


def test_int8_vector_does_not_depend_on_batch(int8: Embedder, shared_dir: Path) -> None:
    """Vectors are cached by content hash: a text must embed the same alone or in any batch."""
    corpus = quality.read_jsonl_strings(shared_dir / "corpus" / "queries.jsonl")[:40]
    texts = ["?", "a", "UNKNOWN", "Add your description here", *corpus, "word " * 150]
    batched = int8.embed(texts, batch_size=32).vectors
    alone = np.stack([int8.embed([t]).vectors[0] for t in texts])
    order = np.random.default_rng(7).permutation(len(texts))
    shuffled = int8.embed([texts[i] for i in order], batch_size=8).vectors[np.argsort(order)]
    assert np.abs(batched - alone).max() <= 1e-5
    assert np.abs(shuffled - alone).max() <= 1e-5


def test_zero_point_rows_fold_the_correction_exactly() -> None:
    rng = np.random.default_rng(3)
    weights, _ = quantize.quantize_weight_columns(rng.normal(size=(48, 10)).astype(np.float32))
    weights[:, 0] = 127  # a column whose sum needs several rows
    rows = quantize.zero_point_rows(weights, align=16)
    assert (weights.shape[0] + len(rows)) % 16 == 0
    np.testing.assert_array_equal(rows.astype(np.int64).sum(axis=0), -weights.astype(np.int64).sum(axis=0))
    q = rng.integers(0, 256, size=(5, 48))
    zp = rng.integers(0, 256, size=(5, 1))
    extended = np.concatenate([q, np.repeat(zp, len(rows), axis=1)], axis=1)
    stacked = np.concatenate([weights, rows]).astype(np.int64)
    np.testing.assert_array_equal(extended @ stacked, (q - zp) @ weights.astype(np.int64))
    assert np.abs(rows.astype(np.int16)).max() <= quantize.ZERO_POINT_ROW_LIMIT


@pytest.mark.parametrize("k", [47, 48, 384])
def test_weights_and_zero_point_rows_keep_the_pair_bound_together(k: int) -> None:
    """What the GEMM sees is [Wq; rows]: its adjacent pairs, across the seam too (odd K), stay
    within AVX2's int16 bound (worker.engine.cpu)."""
    rng = np.random.default_rng(k)
    weights, _ = quantize.quantize_weight_columns(rng.standard_t(3, size=(k, 40)).astype(np.float32))
    stacked = np.concatenate([weights, quantize.zero_point_rows(weights)])
    assert quantize.largest_pair_sum(stacked) <= quantize.PAIR_SUM_LIMIT


def test_per_row_int8_on_opset_18_graph(bundle: Bundle, fp32: Embedder, tmp_path: Path) -> None:
    """From opset 18 ReduceMax/ReduceMin take their axes as an input (imported graphs)."""
    import onnx

    model = onnx.load(str(bundle.variant_path("fp32")))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 18
    staged = tmp_path / "opset18.onnx"
    onnx.save(model, str(staged))
    quantize.to_int8(staged, tmp_path / "int8.onnx")
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    onnx.checker.check_model(quantized)
    reduce_nodes = [n for n in quantized.graph.node if n.op_type == "ReduceMax"]
    assert len(reduce_nodes) == 24 and all(len(n.input) == 2 for n in reduce_nodes)
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    encoded = fp32.prepare(["per-row activations", "x"])
    hidden = session.run(
        ["last_hidden_state"],
        {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask},
    )[0]
    mask = encoded.attention_mask[..., None]
    pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    assert quality.row_cosines(pooled, fp32.run(encoded)).min() > 0.99


def test_int8_file_is_small(bundle: Bundle) -> None:
    assert bundle.variant_path("int8").stat().st_size <= 30_000_000


def test_prefix_and_matryoshka(derive_bundle: DeriveBundle) -> None:
    path = derive_bundle(
        matryoshka_dims=[256, 128],
        prompts={"query": "search_query: ", "document": "search_document: "},
    )
    embedder = Embedder.from_bundle(path, variant="fp32")
    texts = ["how do I parse JSON in Go", "Coming soon."]
    with_task = embedder.embed(texts, task="query").vectors
    manual = embedder.embed(["search_query: " + t for t in texts]).vectors
    plain = embedder.embed(texts).vectors
    np.testing.assert_allclose(with_task, manual, atol=1e-6)
    assert quality.row_cosines(with_task, plain).max() < 0.999  # the prefix changes the vector

    short = embedder.embed(texts, task="query", dimensions=128).vectors
    expected = manual[:, :128] / np.linalg.norm(manual[:, :128], axis=1, keepdims=True)
    assert short.shape == (2, 128)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    assert embedder.embed(texts, dimensions=384).vectors.shape == (2, 384)
    with pytest.raises(InvalidDimensionsError, match="128, 256, 384"):
        embedder.embed(texts, dimensions=100)
    with pytest.raises(UnknownTaskError, match="'classify'"):
        embedder.embed(texts, task="classify")


def test_model_without_prompts_rejects_tasks(fp32: Embedder) -> None:
    with pytest.raises(UnknownTaskError, match="tasks: none"):
        fp32.prepare(["x"], task="query")
    with pytest.raises(InvalidDimensionsError):
        fp32.run(fp32.prepare(["x"]), dimensions=128)


def test_cls_pooling_matches_numpy(derive_bundle: DeriveBundle, bundle: Bundle) -> None:
    embedder = Embedder.from_bundle(derive_bundle(pooling="cls"), variant="fp32")
    texts = ["a short one", "a somewhat longer text about vector databases and caches"]
    encoded = embedder.prepare(texts)
    session = ort.InferenceSession(str(bundle.variant_path("fp32")), providers=["CPUExecutionProvider"])
    hidden = session.run(
        ["last_hidden_state"],
        {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask},
    )[0]
    cls = hidden[:, 0, :] / np.linalg.norm(hidden[:, 0, :], axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.run(encoded), cls, atol=1e-5)
    mean_pooled = Embedder.from_bundle(bundle.path, variant="fp32").run(encoded)
    assert quality.row_cosines(cls, mean_pooled).max() < 0.99


def test_truncation_is_reported(fp32: Embedder) -> None:
    long_text = " ".join(f"word{i}" for i in range(400))
    encoded = fp32.prepare([long_text, "short"])
    assert encoded.truncated == [True, False]
    assert encoded.token_counts[0] == 256
    assert encoded.input_ids.shape == (2, 256)
    assert encoded.input_ids.dtype == np.int64
    assert encoded.attention_mask[1].sum() == encoded.token_counts[1]
    assert fp32.count_tokens([long_text, "short"]) == encoded.token_counts
    output = fp32.embed([long_text, "short"])
    assert output.truncated == [True, False]


def test_embed_restores_order_across_batches(fp32: Embedder) -> None:
    texts = [("word " * n).strip() for n in (3, 120, 1, 60, 30, 200, 7)]
    batched = fp32.embed(texts, batch_size=2, token_budget=300).vectors
    one_by_one = np.stack([fp32.run(fp32.prepare([t]))[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


@given(
    counts=st.lists(st.integers(1, 512), max_size=300),
    batch_size=st.integers(1, 64),
    token_budget=st.integers(1, 8192),
)
def test_plan_batches_respects_size_budget_and_padding(
    counts: list[int], batch_size: int, token_budget: int
) -> None:
    batches = plan_batches(counts, batch_size=batch_size, token_budget=token_budget)
    assert sorted(i for b in batches for i in b) == list(range(len(counts)))
    for batch in batches:
        longest = max(counts[i] for i in batch)
        assert len(batch) <= batch_size
        assert len(batch) == 1 or longest * len(batch) <= token_budget
        assert all(longest - counts[i] <= padding_allowed(longest) for i in batch)
    # Greedy, longest first: a batch is cut only when the next text could not join it.
    for batch, following in itertools.pairwise(batches):
        longest, nxt = max(counts[i] for i in batch), counts[following[0]]
        assert (
            len(batch) == batch_size
            or longest * (len(batch) + 1) > token_budget
            or longest - nxt > padding_allowed(longest)
        )


def test_fault_marker_makes_run_fail(bundle: Bundle) -> None:
    embedder = Embedder.from_bundle(bundle.path, variant="int8", fault_marker="<<poison>>")
    assert embedder.embed(["fine", "also fine"]).vectors.shape == (2, 384)
    with pytest.raises(InjectedFault):
        embedder.embed(["fine", "this has <<poison>> in it"])


def test_missing_files_are_named(derive_bundle: DeriveBundle, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json is missing.*embedfleet model build"):
        load_bundle(tmp_path)
    path = derive_bundle()
    (path / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        load_bundle(path)
    path = derive_bundle()
    (path / "model_int8.onnx").unlink()
    with pytest.raises(BundleError, match=r"model_int8\.onnx is missing"):
        Embedder.from_bundle(path, variant="int8")
    path = derive_bundle()
    (path / "manifest.json").write_text('{"name": ')
    with pytest.raises(BundleError, match=r"manifest\.json is corrupt"):
        load_bundle(path)


@pytest.mark.parametrize(("weights", "filename"), [("u8", "model_int8.onnx"), ("s8", "model_int8_s8.onnx")])
def test_corrupt_model_file_is_named(
    derive_bundle: DeriveBundle, bundle: Bundle, weights: str, filename: str
) -> None:
    if weights == "s8" and not read_cpu().s8_gemm_exact_for(bundle.manifest.int8_s8_pair_sum):
        pytest.skip("this CPU has no AVX2, VNNI or AMX: the s8 weights are never loaded here")
    good = bundle.variant_path("int8", weights).read_bytes()
    path = derive_bundle()
    (path / filename).unlink()
    (path / filename).write_bytes(good[:100_000])
    with pytest.raises(BundleError, match=rf"{re.escape(filename)} is corrupt.*embedfleet model build"):
        Embedder.from_bundle(path, variant="int8", int8_weights=weights)
    # Without a recorded hash, ONNX Runtime's own failure is reported with the file name.
    path = derive_bundle(file_sha256={})
    (path / filename).unlink()
    (path / filename).write_bytes(b"not an onnx file")
    with pytest.raises(BundleError, match=rf"{re.escape(filename)} cannot be loaded"):
        Embedder.from_bundle(path, variant="int8", int8_weights=weights)


def test_import_foreign_onnx(bundle: Bundle, fp32: Embedder, tmp_path: Path) -> None:
    out = tmp_path / "imported"
    code = cli_main(
        [
            "model", "build",
            "--from-onnx", str(bundle.variant_path("fp32")),
            "--tokenizer", str(bundle.tokenizer_path),
            "--out", str(out),
            "--name", "imported-minilm",
            "--max-tokens", "256",
            "--variants", "fp32,int8",
            "--prompt", "query=search_query: ",
        ]
    )  # fmt: skip
    assert code == 0
    imported = load_bundle(out)
    assert imported.manifest.dim == 384
    assert imported.manifest.prompts == {"query": "search_query: "}
    assert imported.manifest.name == "imported-minilm"
    texts = ["an imported encoder", "gives the same vectors"]
    same = Embedder.from_bundle(out, variant="fp32").embed(texts).vectors
    np.testing.assert_allclose(same, fp32.embed(texts).vectors, atol=1e-6)
    quantized = Embedder.from_bundle(out, variant="int8").embed(texts).vectors
    assert quality.row_cosines(quantized, same).min() > 0.95


def test_embed_command_end_to_end(bundle: Bundle, fp32: Embedder, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "first text"}\n"second text"\n\n{"text": "third text"}\n')
    out = tmp_path / "out.jsonl"
    code = cli_main(["embed", str(source), "--model", str(bundle.path), "--variant", "fp32", "-o", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 2, 4]
    vectors = np.array([r["vector"] for r in rows], dtype=np.float32)
    expected = fp32.embed(["first text", "second text", "third text"]).vectors
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


def test_embed_command_rejects_bad_dimensions(bundle: Bundle, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('"x"\n')
    assert cli_main(["embed", str(source), "--model", str(bundle.path), "--dimensions", "7"]) == 1


def test_a_long_text_is_cut_before_tokenizing_without_changing_its_tokens(
    bundle: Bundle, shared_dir: Path
) -> None:
    """TextTokenizer cuts a long text to 8 characters per model token before tokenizing (a 64 KiB
    text would be tokenized whole, overflow windows kept); the kept tokens must be exactly those
    of the whole text, also where the cut falls inside a word, in runs of spaces, in a word the
    tokenizer maps to [UNK], or in text without spaces."""
    from tokenizers import Tokenizer

    from worker.engine.tokenize import TextTokenizer

    max_tokens = bundle.manifest.max_tokens
    capped = TextTokenizer.from_file(bundle.tokenizer_path, max_tokens)
    whole = Tokenizer.from_file(str(bundle.tokenizer_path))
    whole.no_padding()
    whole.enable_truncation(max_length=max_tokens)
    docs = quality.read_jsonl_strings(shared_dir / "corpus" / "docs.jsonl")[:150]
    texts = [
        *docs,
        *(doc * 30 for doc in docs[:20]),
        "a" * 5000 + " b" * 3000,
        " " * 20_000 + "hello world " * 500,
        "漢字" * 10_000,
        "x" * 70_000,
        "supercalifragilistic" * 2000 + " end",
        ("word " * 409) + "internationalization " * 200,
    ]
    for text in texts:
        mine, reference = capped.tokenize([text])[0], whole.encode(text)
        assert mine.ids == reference.ids, text[:60]
        assert mine.truncated == bool(reference.overflowing), text[:60]
