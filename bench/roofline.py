"""How close the engine runs to what this CPU can do: GEMM ceilings, an op-level profile, kernels.

    .venv/bin/python bench/roofline.py [--model DIR] [--threads N] [--json FILE]

1. The CPU: model name and the instruction sets ONNX Runtime's MLAS kernels pick from (AVX2,
   AVX-512, AVX-VNNI / AVX-512 VNNI, AMX), and which INT8 GEMM kernel that means.
2. Roofline: the throughput ONNX Runtime reaches on this CPU for the encoder's GEMM shapes
   (M = 512 token rows; 384x384, 384x1536, 1536x384), FP32 ``MatMul`` against INT8
   ``MatMulInteger`` with u8 activations and u8 weights and with s8 weights (the bundle's two
   encodings of its INT8 weights; s8 is served only where it is exact: VNNI or AMX, or AVX2 on
   pair-bounded weights).
   From it, the tokens/s ceiling of a GEMM-only encoder: all-MiniLM-L6-v2 does about 21 MFLOP of
   GEMM per token (6 layers x 2 x 384 x (4 x 384 + 2 x 1536)).
3. An op-level profile (ONNX Runtime's profiler) of the bundle's INT8 (each encoding this CPU
   runs exactly) and FP32 graphs on one batch
   of queries and one of docs: the share of node time per operator type, and the engine's measured
   tokens/s as a fraction of the GEMM-only ceiling.
Every figure is measured in this run; compare only figures printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.commands.model import shared_dir  # noqa: E402
from worker.engine.bundle import default_bundle_dir, load_bundle  # noqa: E402
from worker.engine.cpu import CpuInfo, read_cpu  # noqa: E402
from worker.engine.embedder import Embedder, session_options  # noqa: E402
from worker.engine.quality import read_jsonl_strings  # noqa: E402

ROWS = 512
SHAPES = ((384, 384), (384, 1536), (1536, 384))
# 6 layers, per token: Q, K, V and output projections (4 x 384 x 384) and the FFN (2 x 384 x 1536),
# two FLOPs per multiply-add.
GEMM_FLOP_PER_TOKEN = 6 * 2 * 384 * (4 * 384 + 2 * 1536)


def int8_kernels(cpu: CpuInfo, pair_sum: int) -> str:
    """Which INT8 GEMM kernel each weight encoding runs on here (``pair_sum``: the bundle's)."""
    exact = "" if cpu.s8_gemm_exact_for(pair_sum) else " (not used here: it would saturate)"
    return f"u8 weights: {cpu.int8_kernel('u8')}; s8 weights: {cpu.int8_kernel('s8')}{exact}"


def gemm_model(k: int, n: int, kind: str) -> bytes:
    """A one-node graph: X[ROWS, k] x W[k, n] as FP32 MatMul or INT8 MatMulInteger."""
    rng = np.random.default_rng(0)
    if kind == "fp32":
        weight = helper.make_tensor(
            "W", TensorProto.FLOAT, [k, n], rng.standard_normal((k, n)).astype(np.float32)
        )
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [ROWS, k])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [ROWS, n])
        inits = [weight]
    else:
        signed = kind == "u8s8"
        dtype, proto = (np.int8, TensorProto.INT8) if signed else (np.uint8, TensorProto.UINT8)
        low, high = (-127, 128) if signed else (0, 256)
        weight = helper.make_tensor(
            "W", proto, [k, n], rng.integers(low, high, (k, n), dtype=dtype).flatten()
        )
        zero_x = helper.make_tensor("zx", TensorProto.UINT8, [], [128])
        zero_w = helper.make_tensor("zw", proto, [], [0 if signed else 128])
        node = helper.make_node("MatMulInteger", ["X", "W", "zx", "zw"], ["Y"])
        x = helper.make_tensor_value_info("X", TensorProto.UINT8, [ROWS, k])
        y = helper.make_tensor_value_info("Y", TensorProto.INT32, [ROWS, n])
        inits = [weight, zero_x, zero_w]
    graph = helper.make_graph([node], "gemm", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def gemm_ops_per_s(k: int, n: int, kind: str, threads: int, seconds: float = 1.0) -> float:
    session = ort.InferenceSession(
        gemm_model(k, n, kind), session_options(threads), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(1)
    x = (
        rng.standard_normal((ROWS, k)).astype(np.float32)
        if kind == "fp32"
        else rng.integers(0, 256, (ROWS, k), dtype=np.uint8)
    )
    session.run(None, {"X": x})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {"X": x})
        runs += 1
    return 2.0 * ROWS * k * n * runs / (time.perf_counter() - started)


def roofline(threads: int) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for kind in ("fp32", "u8u8", "u8s8"):
        per_shape = {f"{k}x{n}": gemm_ops_per_s(k, n, kind, threads) for k, n in SHAPES}
        # The encoder's mix: 4 of the 384x384 GEMMs, one of each FFN GEMM per layer (by FLOPs).
        flops = {"384x384": 4 * 384 * 384, "384x1536": 384 * 1536, "1536x384": 1536 * 384}
        seconds_per_flop = sum(flops[s] / per_shape[s] for s in flops) / sum(flops.values())
        per_shape["mix"] = 1.0 / seconds_per_flop
        table[kind] = per_shape
        print(f"  {kind:5} " + "  ".join(f"{s} {v / 1e9:7.1f} G" for s, v in per_shape.items()), flush=True)
    return table


def profile(
    model: Path, variant: str, weights: str, texts: Sequence[str], threads: int
) -> tuple[dict[str, float], float]:
    """Share of node time per operator type over one batch, and the engine's tokens/s on it."""
    embedder = Embedder.from_bundle(model, variant=variant, intra_op_threads=threads, int8_weights=weights)
    encoded = embedder.prepare(texts)
    embedder.run(encoded)  # warm-up
    started = time.perf_counter()
    for _ in range(3):
        embedder.run(encoded)
    tokens_per_s = 3 * sum(encoded.token_counts) / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        path = embedder.bundle.variant_path(variant, embedder.int8_weights or "u8")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        available = {
            "input_ids": encoded.input_ids,
            "attention_mask": encoded.attention_mask,
            "token_type_ids": np.zeros_like(encoded.input_ids),
        }
        feeds = {i.name: available[i.name] for i in session.get_inputs()}
        for _ in range(3):
            session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values()) or 1.0
    return {op: us / total for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}, tokens_per_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    model = args.model or default_bundle_dir()
    machine = read_cpu()
    pair_sum = load_bundle(model).manifest.int8_s8_pair_sum
    kernels = int8_kernels(machine, pair_sum)
    print(f"CPU: {machine.model} ({machine.cores} logical cores); {', '.join(machine.reported_flags)}")
    print(f"INT8 GEMM kernels: {kernels}; ONNX Runtime {ort.__version__}, {args.threads} threads")
    print("\nGEMM throughput, M = 512 rows (GOP/s; mix = the encoder's share of each shape)")
    ceiling = roofline(args.threads)
    corpus = shared_dir() / "corpus"
    batches = {
        "queries": read_jsonl_strings(corpus / "queries.jsonl")[:64],
        "docs": read_jsonl_strings(corpus / "docs.jsonl")[:16],
    }
    report: dict[str, object] = {
        "cpu": {
            "model": machine.model,
            "cores": machine.cores,
            "flags": machine.reported_flags,
            "int8_kernels": kernels,
        },
        "threads": args.threads,
        "gemm_ops_per_s": ceiling,
        "engine": {},
    }
    print("\nengine on one batch: tokens/s, fraction of the GEMM-only ceiling, top operators by node time")
    engines = [("int8", "u8", "u8u8"), ("fp32", "auto", "fp32")]
    if machine.s8_gemm_exact_for(pair_sum):
        engines.insert(0, ("int8", "s8", "u8s8"))
    for variant, weights, kind in engines:
        tokens_ceiling = ceiling[kind]["mix"] / GEMM_FLOP_PER_TOKEN
        label = f"{variant} {weights}" if variant == "int8" else variant
        for name, texts in batches.items():
            shares, tokens_per_s = profile(model, variant, weights, texts, args.threads)
            top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:7])
            gemm = sum(
                s
                for op, s in shares.items()
                if op
                in (
                    "MatMulInteger",
                    "MatMul",
                    "Gemm",
                    "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul",
                    "QGemm",
                )
            )
            print(
                f"  {label:7} {name:7} {tokens_per_s:8.0f} tok/s = {tokens_per_s / tokens_ceiling:5.1%} of "
                f"{tokens_ceiling:,.0f}; GEMMs {gemm:.0%} of node time; {top}"
            )
            report["engine"][f"{label}/{name}"] = {  # type: ignore[index]
                "tokens_per_s": tokens_per_s,
                "ceiling_tokens_per_s": tokens_ceiling,
                "fraction_of_ceiling": tokens_per_s / tokens_ceiling,
                "op_shares": shares,
            }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
