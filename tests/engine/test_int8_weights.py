"""The int8 variant's two weight encodings (worker.engine.cpu): u8 (u8 x u8 GEMMs, exact on any
x86 CPU) and s8 (u8 x s8: VNNI's instruction, or AVX2's vpmaddubsw on pair-bounded weights): the
choice per CPU, the pair bound of the grid and that the kernel of this CPU is exact at it, the s8
file as the same integer grid, and the same vectors from both where s8 is exact (no timings)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from tests.fleet import EMBEDFLEET
from worker.engine import embedder as embedder_module
from worker.engine import quality, quantize
from worker.engine.bundle import Bundle, BundleError, serving_fingerprint
from worker.engine.cpu import (
    EXACT_S8_FLAGS,
    INT8_WEIGHT_SETTINGS,
    PAIRED_S8_FLAGS,
    VPMADDUBSW_PAIR_LIMIT,
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
BOUNDED = VPMADDUBSW_PAIR_LIMIT  # a builder-5 bundle's recorded pair sum
needs_exact_s8 = pytest.mark.skipif(
    not THIS_CPU.s8_gemm_exact_for(BOUNDED),
    reason=f"this CPU ({THIS_CPU.model}) has no AVX2, VNNI or AMX: s8 is never loaded here",
)


@given(
    flags=st.frozensets(st.sampled_from(SOME_FLAGS)),
    setting=st.sampled_from(INT8_WEIGHT_SETTINGS),
    bundle_has_s8=st.booleans(),
    pair_sum=st.sampled_from([0, 1, BOUNDED, BOUNDED + 1, 254]),
)
def test_s8_weights_are_chosen_only_where_their_gemm_is_exact(
    flags: frozenset[str], setting: str, bundle_has_s8: bool, pair_sum: int
) -> None:
    cpu = CpuInfo("test CPU", 2, flags)
    available = frozenset({"u8", "s8"} if bundle_has_s8 else {"u8"})
    int32_sums = bool(flags & set(EXACT_S8_FLAGS))
    exact = int32_sums or (bool(flags & set(PAIRED_S8_FLAGS)) and 0 < pair_sum <= BOUNDED)
    assert cpu.s8_gemm_exact_for(pair_sum) == exact
    if setting == "s8" and not (exact and bundle_has_s8):
        # No s8 file, or one this CPU's vpmaddubsw would saturate on: rebuild; no kernel: auto.
        rebuild = not bundle_has_s8 or bool(flags & set(PAIRED_S8_FLAGS))
        fix = "embedfleet model build" if rebuild else "EMBEDFLEET_INT8_WEIGHTS=auto"
        with pytest.raises(Int8WeightsError, match=fix):
            choose_int8_weights(setting, cpu, available, pair_sum)
        return
    chosen = choose_int8_weights(setting, cpu, available, pair_sum)
    expected = "s8" if setting == "s8" or (setting == "auto" and exact and bundle_has_s8) else "u8"
    assert chosen == expected
    assert chosen == "u8" or exact  # never a saturating kernel


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
    assert not unknown.s8_gemm_exact_for(BOUNDED)  # nothing known: u8, exact everywhere
    avx2 = CpuInfo("an AVX2 EPYC", 2, frozenset({"avx2"}))
    assert "vpmaddubsw" in avx2.int8_kernel("s8")
    assert avx2.s8_gemm_exact_for(BOUNDED) and not avx2.s8_gemm_exact_for(0)


@settings(max_examples=200, deadline=None)
@given(
    units=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
        elements=st.floats(-400, 400, width=32),
    )
)
def test_bound_pairs_keeps_every_pair_within_the_int16_bound(units: np.ndarray) -> None:
    quantized = quantize.bound_pairs(units)
    assert quantized.dtype == np.int8 and np.abs(quantized.astype(np.int16)).max() <= 127
    assert quantize.largest_pair_sum(quantized) <= VPMADDUBSW_PAIR_LIMIT
    if len(units) % 2:  # a lone last row pairs with a zero-point row (within +-64)
        assert np.abs(quantized[-1].astype(np.int16)).max() <= quantize.ZERO_POINT_ROW_LIMIT
    # Only pairs that broke the bound move, and they land on it.
    even = len(units) - len(units) % 2
    plain = np.clip(np.rint(units[:even]), -127, 127)
    first, second = plain[0::2], plain[1::2]
    over = (np.abs(first + second) > VPMADDUBSW_PAIR_LIMIT) & (first * second > 0)
    moved = (quantized[:even] != plain).reshape(even // 2, 2, units.shape[1]).any(axis=1)
    assert not (moved & ~over).any()
    pair_sums = quantized[0:even:2].astype(np.int16) + quantized[1:even:2].astype(np.int16)
    assert (np.abs(pair_sums[over]) == VPMADDUBSW_PAIR_LIMIT).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 80),
    n=st.integers(1, 12),
    heavy=st.booleans(),
)
def test_pair_bounded_columns_beat_seven_bit_weights(seed: int, k: int, n: int, heavy: bool) -> None:
    """The grid meets the bound, and each column's error is at most the 7-bit grid's (max/63.5,
    which meets it without moving anything: the search's largest step)."""
    rng = np.random.default_rng(seed)
    weights = (rng.standard_t(2, (k, n)) if heavy else rng.standard_normal((k, n))).astype(np.float32)
    quantized, scale = quantize.quantize_weight_columns(weights)
    assert quantize.largest_pair_sum(quantized) <= VPMADDUBSW_PAIR_LIMIT
    assert scale.dtype == np.float32 and (scale > 0).all()
    error = np.square(quantized * scale - weights).sum(axis=0)
    step = np.abs(weights).max(axis=0) / 63.5
    step[step == 0] = 1.0
    seven_bit = np.square(np.rint(weights / step) * step - weights).sum(axis=0)
    assert (error <= seven_bit * (1 + 1e-5) + 1e-12).all()


def _integer_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX Runtime's MatMulInteger, u8 x s8 (MLAS's u8 x s8 kernel of this CPU), one thread."""
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [a.shape[0], b.shape[1]])],
        initializer=[numpy_helper.from_array(b, "b")],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {"a": a})[0]
    return result


@needs_exact_s8
def test_this_cpus_s8_gemm_is_exact_at_the_pair_bound() -> None:
    """The claim the CPU choice rests on, on the CPU running the tests: u8 x s8 with every
    activation 255 and same-sign pairs summing to exactly +-128 gives numpy's int32 sums. And on
    a CPU whose kernel is vpmaddubsw, one more (129) breaks it: the bound is the kernel's."""
    rng = np.random.default_rng(11)
    k, n = 64, 48
    first = rng.integers(1, 128, (k // 2, n))
    sign = rng.choice([-1, 1], (k // 2, n))
    at_bound = np.empty((k, n), dtype=np.int8)
    at_bound[0::2], at_bound[1::2] = sign * first, sign * (VPMADDUBSW_PAIR_LIMIT - first)
    rows = np.concatenate(
        [np.full((4, k), 255, dtype=np.uint8), rng.integers(0, 256, (12, k), dtype=np.uint8)]
    )
    expected = rows.astype(np.int64) @ at_bound.astype(np.int64)
    assert quantize.largest_pair_sum(at_bound) == VPMADDUBSW_PAIR_LIMIT
    assert np.array_equal(_integer_gemm(rows, at_bound), expected)
    if not THIS_CPU.exact_s8_gemm:  # vpmaddubsw: one past the bound saturates
        over = at_bound.copy()
        over[0, :], over[1, :] = 127, 2  # 255 x 129 = 32895 > 32767
        exact = rows.astype(np.int64) @ over.astype(np.int64)
        assert not np.array_equal(_integer_gemm(rows, over)[:4], exact[:4])


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
    assert 0 < quantize.s8_pair_sum(s8) <= VPMADDUBSW_PAIR_LIMIT
    if THIS_CPU.s8_gemm_exact_for(quantize.s8_pair_sum(s8)):  # the same sums: the same floats
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
    # The pair bound the CPU choice relies on, read from the file itself, as the manifest says.
    assert bundle.manifest.int8_s8_pair_sum == quantize.s8_pair_sum(s8_file)
    assert 0 < bundle.manifest.int8_s8_pair_sum <= VPMADDUBSW_PAIR_LIMIT
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
    assert s8.kernel == THIS_CPU.int8_kernel("s8") != u8.kernel
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


def test_an_avx2_cpu_loads_s8_only_from_pair_bounded_bundles(
    bundle: Bundle, derive_bundle: DeriveBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    avx2_only = CpuInfo("an AVX2-only test CPU", 2, frozenset({"avx2", "avx512f", "avx512bw"}))
    monkeypatch.setattr(embedder_module, "read_cpu", lambda: avx2_only)
    assert Embedder.from_bundle(bundle.path, variant="int8").int8_weights == "s8"
    # A bundle from before builder 5 (its s8 weights not pair-bounded): u8, and s8 refused.
    unbounded = derive_bundle(int8_s8_pair_sum=0)
    assert Embedder.from_bundle(unbounded, variant="int8").int8_weights == "u8"
    with pytest.raises(EngineError, match=r"vpmaddubsw.*model build.*EMBEDFLEET_INT8_WEIGHTS=auto"):
        Embedder.from_bundle(unbounded, variant="int8", int8_weights="s8")
    no_avx2 = CpuInfo("an SSE4.2 test CPU", 2, frozenset({"sse4_2"}))
    monkeypatch.setattr(embedder_module, "read_cpu", lambda: no_avx2)
    assert Embedder.from_bundle(bundle.path, variant="int8").int8_weights == "u8"
    with pytest.raises(EngineError, match=r"need AVX2.*EMBEDFLEET_INT8_WEIGHTS=auto"):
        Embedder.from_bundle(bundle.path, variant="int8", int8_weights="s8")


def test_a_bundle_built_before_s8_serves_u8(derive_bundle: DeriveBundle) -> None:
    path = derive_bundle(int8_s8_weights="")
    assert Embedder.from_bundle(path, variant="int8").int8_weights == "u8"
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
