"""Derive the INT8 (CPU) and FP16 (CUDA) variants from the FP32 graph.

INT8 (``to_int8``): every MatMul with per-channel int8 weights (stored as uint8 + 128 with a weight
zero point of 128, so the GEMM is u8 x u8, which cannot saturate on AVX2 CPUs without VNNI) and
per-row (per-token) asymmetric uint8 activations computed in the graph, so a text's vector does
not depend on its batch; the word-embedding table as int8 rows. Why this scheme, and the
measurements of every scheme tried: ``QUANTIZATION.md`` beside this file. ``to_s8_weights``
stores the same weights as int8 (u8 x s8 GEMMs: VNNI's instruction); which one a CPU runs is
``worker.engine.cpu``'s choice.

FP16 (``to_fp16``): onnxruntime.transformers.float16 with keep_io_types, so the I/O stays
int64 ids / float32 hidden states; it is meant for the CUDA provider (the CPU has no FP16
kernels for the fused operators).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.cpu import VPMADDUBSW_PAIR_LIMIT
from worker.engine.cpu_graph import default_opset, split_skip_layer_norms

MS_DOMAIN = "com.microsoft"

# Node names kept in FP32 by the INT8 pass. Empty since per-row activation quantization: the
# per-tensor scheme had to keep layer0/layer2 FFN output in FP32 (see the module docstring).
SENSITIVE_MATMULS: tuple[str, ...] = ()
# A Gather table with at least this many rows is treated as an embedding table.
MIN_EMBEDDING_ROWS = 1000
# Per-row quantization builds on per-axis QuantizeLinear (opset 13).
MIN_PER_ROW_OPSET = 13
ActivationScheme = Literal["per-row", "per-tensor"]
# Largest |int8 weight| of a quantized MatMul (see quantize_weight_columns).
WEIGHT_LIMIT = 127
WEIGHT_ZERO_POINT = 128
# The largest |sum| of two same-sign weights in adjacent rows (2j, 2j + 1) of a GEMM's weights, the
# zero-point rows included: AVX2's u8 x s8 GEMM (vpmaddubsw) adds a u8 activation (<= 255) times
# each of such a pair in int16, and 255 x 128 = 32640 fits (255 x 129 does not). See
# quantize_weight_columns.
PAIR_SUM_LIMIT = VPMADDUBSW_PAIR_LIMIT
# Zero-point rows pair with each other (K + J is even), so each entry stays within half the bound.
ZERO_POINT_ROW_LIMIT = PAIR_SUM_LIMIT // 2
# The column scales tried by quantize_weight_columns, as multiples of max|w| / 127 (the plain
# int8 grid); the search keeps, per column, the one with the least squared error.
SCALE_FACTORS = np.linspace(1.0, 2.0, 51, dtype=np.float32)

QUANTIZATION_NOTES = (
    "int8: MatMul weights int8 per output column; activations uint8 per row (per token, "
    "asymmetric min/max, computed in the graph, so a text's vector does not depend on its "
    "batch); {excluded} kept FP32; embedding tables as int8 rows with per-row scales; "
    "attention core FP32; layer norms as plain Add + LayerNormalization (faster on ONNX "
    "Runtime's CPU kernels than SkipLayerNormalization); the weights stored as uint8 + 128 "
    "(u8 x u8 GEMMs, exact on any x86 CPU) and again as int8 (u8 x s8, for CPUs with VNNI or "
    "AMX: the same vectors). "
    "fp16: float16 weights and compute, float32/int64 I/O, for the CUDA provider."
)


def quantize_embedding_tables(model: onnx.ModelProto) -> int:
    """Store large Gather tables as symmetric int8 rows with one float scale per row:
    ``Gather(int8) -> Cast -> Mul(Gather(scale))``. Returns how many tables were rewritten."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    rewritten = 0
    for node in list(graph.node):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != TensorProto.FLOAT:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weights = numpy_helper.to_array(table)
        if weights.ndim != 2 or weights.shape[0] < MIN_EMBEDDING_ROWS or attrs.get("axis", 0):
            continue
        scale = np.abs(weights).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        quantized = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
        base, ids, out = table.name, node.input[1], node.output[0]
        graph.initializer.remove(table)
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{base}_int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{base}_row_scale"),
            ]
        )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        replacement = [
            helper.make_node("Gather", [f"{base}_int8", ids], [f"{out}_int8"], name=f"{out}_int8"),
            helper.make_node(
                "Cast", [f"{out}_int8"], [f"{out}_float"], name=f"{out}_float", to=TensorProto.FLOAT
            ),
            helper.make_node("Gather", [f"{base}_row_scale", ids], [f"{out}_scale"], name=f"{out}_scale"),
            helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out], name=f"{out}_dequant"),
        ]
        for offset, new_node in enumerate(replacement):
            graph.node.insert(position + offset, new_node)
        rewritten += 1
    return rewritten


def to_int8(
    fp32_model: Path,
    output: Path,
    exclude_nodes: Sequence[str] = SENSITIVE_MATMULS,
    quantize_embeddings: bool = True,
    activations: ActivationScheme = "per-row",
) -> None:
    """Write the INT8 variant of ``fp32_model`` to ``output``. ``activations="per-tensor"`` is
    the former ONNX Runtime quantize_dynamic scheme (batch-dependent), kept for comparison and
    for imported graphs older than opset 13. Either way the layer norms are split for the CPU
    (``worker.engine.cpu_graph``): INT8 runs only there."""
    model = onnx.load(str(fp32_model))
    split_skip_layer_norms(model)
    if quantize_embeddings:
        quantize_embedding_tables(model)
    if activations == "per-row" and default_opset(model) >= MIN_PER_ROW_OPSET:
        quantize_matmuls_per_row(model, exclude_nodes)
        onnx.save(model, str(output))
        return
    present = {n.name for n in model.graph.node}
    with tempfile.TemporaryDirectory(prefix="embedfleet-int8-") as scratch:
        staged = Path(scratch) / "staged.onnx"
        onnx.save(model, str(staged))
        del model
        # The quantizer logs a "consider pre-processing" warning on the root logger; its
        # pre-processing (symbolic shape inference) does not apply to com.microsoft operators.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            _quantize_matmuls(staged, output, exclude_nodes, present)
        finally:
            root.setLevel(level)


def quantize_weight_columns(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column, ``weights ~= quantized * scale``, on a grid that every
    x86 INT8 GEMM computes exactly: within each column, two same-sign weights in adjacent rows
    (2j, 2j + 1) sum to at most ``PAIR_SUM_LIMIT`` in magnitude (``bound_pairs``).

    Why: AVX2's u8 x s8 kernel (``vpmaddubsw``, the fastest INT8 GEMM there: 1.3x u8 x u8 on an
    AVX2 EPYC) adds the two products of each such pair in int16, which a plain int8 grid
    overflows (127 + 127); VNNI and AMX accumulate in int32 and u8 x u8 widens to int16 first,
    so on those the bound changes nothing. Each column's scale is searched from max|w| / 127 up
    (``SCALE_FACTORS``) for the least squared error: a larger step rarely needs a pair moved, a
    smaller one moves more pairs to the bound. 7-bit weights (ONNX Runtime's ``reduce_range``)
    would meet the bound too, at twice the step (reference minimum cosine 0.983 against 0.992;
    ``QUANTIZATION.md``). An odd last row pairs with a zero-point row (entries within
    ``ZERO_POINT_ROW_LIMIT``), so it stays within the rest of the bound."""
    weights = np.asarray(weights, dtype=np.float32)
    peak = np.abs(weights).max(axis=0) / WEIGHT_LIMIT
    peak[peak == 0] = 1.0
    best_error = np.full(weights.shape[1], np.inf, dtype=np.float32)
    best_scale = peak.copy()
    best = np.zeros(weights.shape, dtype=np.int8)
    for factor in SCALE_FACTORS:
        scale = peak * factor
        quantized = bound_pairs(weights / scale)
        error = np.square(quantized * scale - weights).sum(axis=0)
        better = error < best_error
        best_error[better], best_scale[better] = error[better], scale[better]
        best[:, better] = quantized[:, better]
    return best, best_scale


def bound_pairs(units: np.ndarray) -> np.ndarray:
    """``units`` (weights / scale, [K, N]) rounded to int8 within +-``WEIGHT_LIMIT`` such that
    any two same-sign entries of rows 2j and 2j + 1 of a column sum to at most
    ``PAIR_SUM_LIMIT`` in magnitude. A pair over it goes to the nearest integers on the bound
    (each gives up half the excess); a lone last row (odd K) to within ``ZERO_POINT_ROW_LIMIT``."""
    rounded = np.clip(np.rint(units), -WEIGHT_LIMIT, WEIGHT_LIMIT)
    k = len(rounded) - len(rounded) % 2
    first, second = rounded[0:k:2], rounded[1:k:2]
    total = first + second
    over = (np.abs(total) > PAIR_SUM_LIMIT) & (first * second > 0)
    if over.any():
        sign = np.sign(total)
        near, far = np.abs(units[0:k:2]), np.abs(units[1:k:2])
        excess = (near + far - PAIR_SUM_LIMIT) / 2
        low = PAIR_SUM_LIMIT - WEIGHT_LIMIT
        moved = np.clip(np.rint(near - excess), low, WEIGHT_LIMIT)
        first[over] = (sign * moved)[over]
        second[over] = (sign * (PAIR_SUM_LIMIT - moved))[over]
    if len(rounded) % 2:
        rounded[-1] = np.clip(rounded[-1], -ZERO_POINT_ROW_LIMIT, ZERO_POINT_ROW_LIMIT)
    quantized: np.ndarray = rounded.astype(np.int8)  # rows 0:k:2 and 1:k:2 were views of it
    return quantized


def largest_pair_sum(quantized: np.ndarray) -> int:
    """The largest |sum| of two same-sign int8 weights in rows 2j, 2j + 1 of one column of
    ``quantized`` ([K, N]; an odd last row pairs with an implicit zero row): what AVX2's u8 x s8
    GEMM needs at most ``PAIR_SUM_LIMIT`` (see ``quantize_weight_columns``)."""
    values = quantized.astype(np.int32)
    if len(values) % 2:
        values = np.concatenate([values, np.zeros((1, values.shape[1]), dtype=np.int32)])
    first, second = values[0::2], values[1::2]
    positive = np.maximum(first, 0) + np.maximum(second, 0)
    negative = np.maximum(-first, 0) + np.maximum(-second, 0)
    return int(max(positive.max(initial=0), negative.max(initial=0)))


def _as_uint8(signed: np.ndarray) -> np.ndarray:
    """int8 weights stored as uint8 around WEIGHT_ZERO_POINT: the same grid, shifted, so the
    GEMM is u8 x u8, which MLAS widens to int16 before multiplying: exact on every x86 CPU (and
    the only exact INT8 GEMM for a grid without the pair bound on CPUs without VNNI). The s8
    file (``to_s8_weights``) holds the same grid as int8."""
    return (signed.astype(np.int16) + WEIGHT_ZERO_POINT).astype(np.uint8)


def zero_point_rows(quantized: np.ndarray, align: int = 16, limit: int = ZERO_POINT_ROW_LIMIT) -> np.ndarray:
    """Extra int8 weight rows that fold the activations' per-row zero point into the integer
    GEMM: with ``q ~= x / s + zp`` (uint8), ``x @ W ~= s * ((q - zp) @ Wq)`` and
    ``-zp * colsum(Wq)`` is exactly ``[zp, ..., zp] @ rows`` when each column of ``rows`` sums
    to ``-colsum(Wq)``. Entries stay within +-``limit`` (half the pair bound, so two adjacent
    rows keep it: see ``quantize_weight_columns``), J = ceil(max |colsum| / limit), and K + J is
    padded to ``align``."""
    target = -quantized.astype(np.int64).sum(axis=0)
    k = quantized.shape[0]
    count = max(1, int(np.ceil(np.abs(target).max() / limit)))
    count = -(-(k + count) // align) * align - k
    base = target // count
    remainder = target - base * count
    rows = np.stack([base + (j < remainder) for j in range(count)]).astype(np.int8)
    return rows


def quantize_matmuls_per_row(model: onnx.ModelProto, exclude_nodes: Sequence[str] = ()) -> int:
    """Rewrite every ``MatMul(x, W)`` with a constant 2-D float W (names in ``exclude_nodes``
    excepted) as per-row dynamic quantization built from standard operators:

        x2 = Reshape(x, [-1, K]); lo, hi = min(ReduceMin(x2), 0), max(ReduceMax(x2), 0)
        s = max(hi - lo, tiny) / 255; zp = Round(-lo / s)   (one scale and zero point per row)
        q = QuantizeLinear(x2, s, zp, axis=0)               (uint8)
        y = MatMulIntegerToFloat([q | zp x J], [Wq ; rows] + 128, 1, w_scale, -, 128) * s -> Reshape

    ``rows`` (``zero_point_rows``) make the zero-point correction part of the integer GEMM,
    which is exact, so each row's result depends on that row only. Returns the count."""
    graph = model.graph
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    axes_as_input = default_opset(model) >= 18
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    shared: dict[str, np.ndarray] = {
        "rq_last": np.array([-1], dtype=np.int64),
        "rq_zero": np.array(0.0, dtype=np.float32),
        "rq_one": np.array(1.0, dtype=np.float32),
        "rq_tiny": np.array(1e-30, dtype=np.float32),
        "rq_inv255": np.array(1.0 / 255.0, dtype=np.float32),
        "rq_begin": np.array([0], dtype=np.int64),
    }
    excluded = set(exclude_nodes)
    rewritten = 0
    for node in list(graph.node):
        table = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if table is None or node.name in excluded or table.data_type != TensorProto.FLOAT:
            continue
        weights = numpy_helper.to_array(table)
        if weights.ndim != 2:
            continue
        k, n_out = weights.shape
        quantized, column_scale = quantize_weight_columns(weights)
        rows = zero_point_rows(quantized)
        base = node.name or node.output[0]
        if uses.get(table.name, 0) <= 1:
            graph.initializer.remove(table)
        graph.initializer.extend(
            [
                numpy_helper.from_array(_as_uint8(np.concatenate([quantized, rows])), f"{base}_wq"),
                numpy_helper.from_array(np.full(n_out, WEIGHT_ZERO_POINT, dtype=np.uint8), f"{base}_wzp"),
                numpy_helper.from_array(column_scale, f"{base}_wscale"),
                numpy_helper.from_array(np.array([-1, k], dtype=np.int64), f"{base}_rows_shape"),
                numpy_helper.from_array(np.array([1, len(rows)], dtype=np.int64), f"{base}_zp_repeat"),
                numpy_helper.from_array(np.array([n_out], dtype=np.int64), f"{base}_n"),
            ]
        )
        replacement = _per_row_nodes(base, node.input[0], node.output[0], axes_as_input)
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new_node in enumerate(replacement):
            graph.node.insert(position + offset, new_node)
        rewritten += 1
    if rewritten:
        present = {t.name for t in graph.initializer}
        graph.initializer.extend(
            numpy_helper.from_array(value, name) for name, value in shared.items() if name not in present
        )
    return rewritten


def _per_row_nodes(base: str, x: str, y: str, axes_as_input: bool) -> list[onnx.NodeProto]:
    """The nodes replacing ``MatMul(x, W) -> y`` (see ``quantize_matmuls_per_row``)."""

    def op(kind: str, inputs: list[str], suffix: str, **attrs: Any) -> onnx.NodeProto:
        name = f"{base}_{suffix}"
        domain = MS_DOMAIN if kind == "MatMulIntegerToFloat" else ""
        return helper.make_node(kind, inputs, [name], name=name, domain=domain, **attrs)

    def reduce(kind: str, suffix: str) -> onnx.NodeProto:
        if axes_as_input:
            return op(kind, [f"{base}_x2", "rq_last"], suffix, keepdims=1)
        return op(kind, [f"{base}_x2"], suffix, axes=[-1], keepdims=1)

    replacement = [
        op("Shape", [x], "shape"),
        op("Reshape", [x, f"{base}_rows_shape"], "x2"),
        reduce("ReduceMax", "max"),
        reduce("ReduceMin", "min"),
        op("Max", [f"{base}_max", "rq_zero"], "hi"),
        op("Min", [f"{base}_min", "rq_zero"], "lo"),
        op("Sub", [f"{base}_hi", f"{base}_lo"], "range"),
        op("Max", [f"{base}_range", "rq_tiny"], "range_pos"),
        op("Mul", [f"{base}_range_pos", "rq_inv255"], "scale"),
        op("Div", [f"{base}_lo", f"{base}_scale"], "lo_steps"),
        op("Neg", [f"{base}_lo_steps"], "zp_float"),
        op("Round", [f"{base}_zp_float"], "zp_round"),
        op("Cast", [f"{base}_zp_round"], "zp", to=TensorProto.UINT8),
        op("Reshape", [f"{base}_scale", "rq_last"], "scale_1d"),
        op("Reshape", [f"{base}_zp", "rq_last"], "zp_1d"),
        op("QuantizeLinear", [f"{base}_x2", f"{base}_scale_1d", f"{base}_zp_1d"], "q", axis=0),
        op("Expand", [f"{base}_zp", f"{base}_zp_repeat"], "zp_cols"),
        op("Concat", [f"{base}_q", f"{base}_zp_cols"], "q_ext", axis=1),
        op(
            "MatMulIntegerToFloat",
            [f"{base}_q_ext", f"{base}_wq", "rq_one", f"{base}_wscale", "", f"{base}_wzp"],
            "int_out",
        ),
        op("Mul", [f"{base}_int_out", f"{base}_scale"], "y2"),
        op("Slice", [f"{base}_shape", "rq_begin", "rq_last"], "lead"),
        op("Concat", [f"{base}_lead", f"{base}_n"], "out_shape", axis=0),
    ]
    replacement.append(
        helper.make_node("Reshape", [f"{base}_y2", f"{base}_out_shape"], [y], name=f"{base}_out")
    )
    return replacement


def to_s8_weights(int8_model: Path, output: Path) -> int:
    """Write ``int8_model`` (``to_int8``'s per-row graph) with its MatMul weights stored as int8
    instead of uint8 + 128: the same integer grid (``w_u8 - 128 == w_s8`` exactly, and each
    GEMM's zero-point term was exact integer arithmetic), so the same integer sums and the same
    vectors, on the u8 x s8 kernels that VNNI and AMX run. Returns how many MatMuls it rewrote."""
    model = onnx.load(str(int8_model))
    initializers = {t.name: t for t in model.graph.initializer}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) < 6:
            continue
        weights, zero_point = initializers.get(node.input[1]), initializers.get(node.input[5])
        if weights is None or zero_point is None or weights.data_type != TensorProto.UINT8:
            continue
        points = numpy_helper.to_array(zero_point)
        if not np.all(points == WEIGHT_ZERO_POINT):
            raise ValueError(f"{node.name}: weight zero points other than {WEIGHT_ZERO_POINT}")
        signed = (numpy_helper.to_array(weights).astype(np.int16) - WEIGHT_ZERO_POINT).astype(np.int8)
        weights.CopyFrom(numpy_helper.from_array(signed, weights.name))
        del node.input[5]  # no weight zero point: 0
        rewritten += 1
    used = {name for node in model.graph.node for name in node.input}
    for unused in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(unused)
    onnx.save(model, str(output))
    return rewritten


def s8_pair_sum(s8_model: Path) -> int:
    """The largest same-sign adjacent pair sum (``largest_pair_sum``) over the int8 weights of
    every GEMM of ``s8_model`` (``to_s8_weights``'s file): at most ``PAIR_SUM_LIMIT`` means AVX2's
    u8 x s8 GEMM runs it exactly (worker.engine.cpu); 0 if it has no int8 weights."""
    model = onnx.load(str(s8_model))
    initializers = {t.name: t for t in model.graph.initializer}
    largest = 0
    for node in model.graph.node:
        weights = initializers.get(node.input[1]) if node.op_type == "MatMulIntegerToFloat" else None
        if weights is not None and weights.data_type == TensorProto.INT8:
            largest = max(largest, largest_pair_sum(numpy_helper.to_array(weights)))
    return largest


def _quantize_matmuls(staged: Path, output: Path, exclude_nodes: Sequence[str], present: set[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        staged,
        output,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=[n for n in exclude_nodes if n in present],
        # Outputs of com.microsoft operators have no inferred type; they are all float.
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )


def to_fp16(fp32_model: Path, output: Path) -> None:
    """Write the FP16 variant (float32 / int64 I/O kept) of ``fp32_model`` to ``output``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_model))
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    onnx.save(converted, str(output))
