"""The INT8 graphs' layer norms as plain ops (worker.engine.cpu_graph): the same function as
SkipLayerNormalization, kept unfused by the engine's sessions, and in every built INT8 file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from worker.engine.bundle import Bundle
from worker.engine.cpu_graph import split_skip_layer_norms
from worker.engine.embedder import session_options

MS = "com.microsoft"


def skip_layer_norm_graph(hidden: int, *, bias: bool, beta: bool, opset: int = 17) -> onnx.ModelProto:
    """x, skip -> SkipLayerNormalization -> Mul by 2 (a consumer, as in the encoder)."""
    rng = np.random.default_rng(hidden)
    inits = [numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "gamma")]
    inputs = ["x", "skip", "gamma", "beta" if beta else "", "bias" if bias else ""]
    if beta:
        inits.append(numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "beta"))
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "bias"))
    inits.append(numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"))
    while inputs[-1] == "":
        inputs.pop()
    nodes = [
        helper.make_node("SkipLayerNormalization", inputs, ["norm"], name="ln", domain=MS, epsilon=1e-12),
        helper.make_node("Mul", ["norm", "two"], ["y"]),
    ]
    shape: list[str | int | None] = ["batch", "sequence", hidden]
    graph = helper.make_graph(
        nodes,
        "skip_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    )
    model.ir_version = 8
    return model


def optimized_ops(model: onnx.ModelProto | Path, tmp_path: Path) -> Counter[str]:
    """Operator counts of the graph an engine session runs (after ONNX Runtime's fusions)."""
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )
    result: np.ndarray = session.run(["y"], feeds)[0]
    return result


@settings(max_examples=12, deadline=None)
@given(
    hidden=st.sampled_from([8, 32, 384]),
    batch=st.integers(1, 3),
    sequence=st.integers(1, 9),
    bias=st.booleans(),
    beta=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_split_layer_norms_compute_what_the_fused_node_computes(
    hidden: int, batch: int, sequence: int, bias: bool, beta: bool, seed: int
) -> None:
    fused = skip_layer_norm_graph(hidden, bias=bias, beta=beta)
    split = skip_layer_norm_graph(hidden, bias=bias, beta=beta)
    assert split_skip_layer_norms(split) == 1
    onnx.checker.check_model(split)
    ops = Counter(node.op_type for node in split.graph.node)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 1
    assert ops["Add"] == (2 if bias else 1)
    rng = np.random.default_rng(seed)
    feeds = {name: rng.normal(size=(batch, sequence, hidden)).astype(np.float32) for name in ("x", "skip")}
    np.testing.assert_allclose(run(split, feeds), run(fused, feeds), rtol=1e-4, atol=1e-5)


def test_the_engine_session_keeps_them_split(tmp_path: Path) -> None:
    """Left to itself, ONNX Runtime fuses Add + Add + LayerNormalization back into the slower
    SkipLayerNormalization; the engine's session options turn that fusion off."""
    model = skip_layer_norm_graph(32, bias=True, beta=True)
    split_skip_layer_norms(model)
    assert optimized_ops(model, tmp_path)["SkipLayerNormalization"] == 0
    plain = ort.SessionOptions()
    plain.optimized_model_filepath = str(tmp_path / "default.onnx")
    ort.InferenceSession(model.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    refused = Counter(node.op_type for node in onnx.load(plain.optimized_model_filepath).graph.node)
    assert refused["SkipLayerNormalization"] == 1  # what the option prevents


def test_graphs_without_layer_normalization_or_with_other_outputs_are_left_alone() -> None:
    old = skip_layer_norm_graph(16, bias=True, beta=True, opset=16)
    assert split_skip_layer_norms(old) == 0
    assert [n.op_type for n in old.graph.node] == ["SkipLayerNormalization", "Mul"]
    with_sum = skip_layer_norm_graph(16, bias=True, beta=True)
    with_sum.graph.node[0].output.extend(["", "", "sum"])  # the residual sum used elsewhere
    assert split_skip_layer_norms(with_sum) == 0


@pytest.mark.parametrize("weights", ["u8", "s8"])
def test_built_int8_files_run_plain_layer_norms(bundle: Bundle, weights: str, tmp_path: Path) -> None:
    if weights not in bundle.int8_weights:
        pytest.skip("this bundle has no s8 file")
    path = bundle.variant_path("int8", weights)
    in_file = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert in_file["SkipLayerNormalization"] == 0
    assert in_file["LayerNormalization"] == 13  # embeddings + two per layer
    assert optimized_ops(path, tmp_path)["SkipLayerNormalization"] == 0
