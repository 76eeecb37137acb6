"""The int8 variant's two weight encodings (worker.engine.cpu): u8 (u8 x u8 GEMMs, exact on any
x86 CPU) and s8 (u8 x s8, VNNI's instruction): the choice per CPU, the s8 file as the same
integer grid, and the same vectors from both where s8 is exact (no timings here)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.fleet import EMBEDFLEET
from worker.engine import embedder as embedder_module
from worker.engine import quality, quantize
from worker.engine.bundle import Bundle, BundleError, serving_fingerprint
from worker.engine.cpu import (
    EXACT_S8_FLAGS,
    INT8_WEIGHT_SETTINGS,
    CpuInfo,
    Int8WeightsError,
    choose_int8_weights,
    read_cpu,
)
from worker.engine.embedder import Embedder
from worker.engine.errors import EngineError

DeriveBundle = Callable[..., Path]
SOME_FLAGS = ("sse4_2", "avx2", "avx512f", "avx512bw", *EXACT_S8_FLAGS, "avx512_bf16")
THIS_CPU = read_cpu()
needs_exact_s8 = pytest.mark.skipif(
    not THIS_CPU.exact_s8_gemm,
    reason=f"this CPU ({THIS_CPU.model}) has no AVX-512 VNNI, AVX-VNNI or AMX: s8 is never loaded here",
)


@given(
    flags=st.frozensets(st.sampled_from(SOME_FLAGS)),
    setting=st.sampled_from(INT8_WEIGHT_SETTINGS),
    bundle_has_s8=st.booleans(),
)
def test_s8_weights_are_chosen_only_where_their_gemm_is_exact(
    flags: frozenset[str], setting: str, bundle_has_s8: bool
) -> None:
    cpu = CpuInfo("test CPU", 2, flags)
    available = frozenset({"u8", "s8"} if bundle_has_s8 else {"u8"})
    exact = bool(flags & set(EXACT_S8_FLAGS))
    if setting == "s8" and not (exact and bundle_has_s8):
        with pytest.raises(Int8WeightsError, match="VNNI" if not exact else "embedfleet model build"):
            choose_int8_weights(setting, cpu, available)
        return
    chosen = choose_int8_weights(setting, cpu, available)
    expected = "s8" if setting == "s8" or (setting == "auto" and exact and bundle_has_s8) else "u8"
    assert chosen == expected
    assert chosen == "u8" or exact  # never the saturating kernel


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(Int8WeightsError, match="auto, u8, s8"):
        choose_int8_weights("s4", CpuInfo("x", 1, frozenset(EXACT_S8_FLAGS)), frozenset({"u8", "s8"}))


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test EPYC 9999\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: Test EPYC 9999\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    )
    cpu = read_cpu(info)
    assert cpu.model == "Test EPYC 9999"
    assert cpu.exact_s8_gemm
    assert cpu.reported_flags == ["avx2", "avx512f", "avx512_vnni"]
    assert "vpdpbusd" in cpu.int8_kernel("s8")
    unknown = read_cpu(tmp_path / "absent")
    assert unknown.flags == frozenset()
    assert not unknown.exact_s8_gemm  # nothing known: u8, exact everywhere


def _tiny_per_row_int8(tmp_path: Path) -> Path:
    """A two-MatMul FP32 graph (opset 17) through to_int8's per-row scheme."""
    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((96, 32)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 32])],
        initializer=[w1, w2],
    )
    fp32 = tmp_path / "tiny_fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    int8 = tmp_path / "tiny_int8.onnx"
    quantize.to_int8(fp32, int8, quantize_embeddings=False)
    return int8


def test_s8_weights_are_the_u8_grid_shifted(tmp_path: Path) -> None:
    int8 = _tiny_per_row_int8(tmp_path)
    s8 = tmp_path / "tiny_s8.onnx"
    assert quantize.to_s8_weights(int8, s8) == 2
    u8_model, s8_model = onnx.load(str(int8)), onnx.load(str(s8))
    u8_weights = {t.name: numpy_helper.to_array(t) for t in u8_model.graph.initializer}
    s8_weights = {t.name: numpy_helper.to_array(t) for t in s8_model.graph.initializer}
    gemms = [n for n in s8_model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(gemms) == 2
    for node in gemms:
        assert len(node.input) == 5  # no weight zero point: 0
        signed = s8_weights[node.input[1]]
        assert signed.dtype == np.int8
        assert np.array_equal(signed.astype(np.int16), u8_weights[node.input[1]].astype(np.int16) - 128)
    assert not any(name.endswith("_wzp") for name in s8_weights)  # dropped with their inputs
    if THIS_CPU.exact_s8_gemm:  # the same integer sums: the same floats out
        x = np.random.default_rng(3).standard_normal((3, 5, 64)).astype(np.float32) * 4
        outputs = [
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for path in (int8, s8)
        ]
        assert np.array_equal(outputs[0], outputs[1])


def test_a_graph_without_per_row_gemms_gets_no_s8_file(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    source = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    assert quantize.to_s8_weights(source, tmp_path / "relu_s8.onnx") == 0


def test_the_bundle_carries_both_encodings(bundle: Bundle) -> None:
    assert bundle.int8_weights == frozenset({"u8", "s8"})
    s8_file = bundle.variant_path("int8", "s8")
    assert s8_file.name == bundle.manifest.int8_s8_weights
    assert s8_file.name in bundle.manifest.file_sha256  # checked on load like the others
    # One fingerprint: the s8 file is not part of it (the same vectors, see below).
    u8 = Embedder.from_bundle(bundle.path, variant="int8", int8_weights="u8")
    assert u8.int8_weights == "u8"
    assert u8.model_fingerprint == serving_fingerprint(bundle.manifest, "int8")


@needs_exact_s8
def test_s8_and_u8_weights_give_the_same_vectors(bundle: Bundle, shared_dir: Path) -> None:
    reference = quality.read_reference(shared_dir / "reference" / "all-MiniLM-L6-v2")
    corpus = shared_dir / "corpus"
    texts = [
        *reference.texts,
        *quality.read_jsonl_strings(corpus / "queries.jsonl")[:300],
        *quality.read_jsonl_strings(corpus / "docs.jsonl")[:20],
    ]
    u8 = Embedder.from_bundle(bundle.path, variant="int8", int8_weights="u8")
    s8 = Embedder.from_bundle(bundle.path, variant="int8", int8_weights="s8")
    assert "vpdpbusd" in s8.kernel or "AMX" in s8.kernel
    assert s8.model_fingerprint == u8.model_fingerprint
    assert np.array_equal(u8.embed(texts).vectors, s8.embed(texts).vectors)
    # And what the floors ask of any INT8 vector, from the s8 weights themselves.
    cosines = quality.row_cosines(s8.embed(reference.texts).vectors, reference.vectors)
    assert cosines.min() >= 0.99 and cosines.mean() >= 0.995
    sample = list(reference.texts[:64])
    alone = np.stack([s8.embed([text]).vectors[0] for text in sample])
    assert np.array_equal(s8.embed(sample, batch_size=32).vectors, alone)


@needs_exact_s8
def test_auto_takes_s8_here(int8: Embedder) -> None:
    assert int8.int8_weights == "s8"


def test_a_cpu_without_vnni_never_loads_s8(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    avx2_only = CpuInfo("an AVX2-only test CPU", 2, frozenset({"avx2", "avx512f", "avx512bw"}))
    monkeypatch.setattr(embedder_module, "read_cpu", lambda: avx2_only)
    assert Embedder.from_bundle(bundle.path, variant="int8").int8_weights == "u8"
    with pytest.raises(EngineError, match=r"VNNI.*EMBEDFLEET_INT8_WEIGHTS=auto"):
        Embedder.from_bundle(bundle.path, variant="int8", int8_weights="s8")


def test_a_bundle_built_before_s8_serves_u8(derive_bundle: DeriveBundle) -> None:
    path = derive_bundle(int8_s8_weights="")
    assert Embedder.from_bundle(path, variant="int8").int8_weights == "u8"
    if THIS_CPU.exact_s8_gemm:
        with pytest.raises(EngineError, match="embedfleet model build"):
            Embedder.from_bundle(path, variant="int8", int8_weights="s8")
    fp32 = Embedder.from_bundle(path, variant="fp32", int8_weights="s8")  # not an int8 setting
    assert fp32.int8_weights is None


def test_asking_a_bundle_for_s8_it_lacks_names_the_fix(derive_bundle: DeriveBundle) -> None:
    from worker.engine.bundle import load_bundle

    with pytest.raises(BundleError, match=r"no s8 INT8 weights.*embedfleet model build"):
        load_bundle(derive_bundle(int8_s8_weights="")).variant_path("int8", "s8")


def test_the_worker_refuses_weights_it_cannot_serve_in_one_line(derive_bundle: DeriveBundle) -> None:
    """`embedfleet worker` with s8 weights its bundle lacks: one line saying what to do, exit 2,
    before it touches Kafka or Redis."""
    path = derive_bundle(int8_s8_weights="")
    done = subprocess.run(
        [EMBEDFLEET, "worker", "--model", str(path), "--variant", "int8", "--int8-weights", "s8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: " in done.stderr
    assert "EMBEDFLEET_INT8_WEIGHTS=auto" in done.stderr or "embedfleet model build" in done.stderr
    assert "Traceback" not in done.stderr
