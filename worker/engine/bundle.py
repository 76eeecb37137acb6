"""Model bundles: a directory with ONNX variants, ``tokenizer.json`` and ``manifest.json``.

The manifest says everything the engine needs to turn token ids into the model's vectors
(pooling, normalisation, Matryoshka dimensions, task prefixes) so that the engine holds no
per-model knowledge of its own. ``load_bundle`` validates the directory up front and fails
with an error naming the missing or corrupt file and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from worker.checkout import default_home
from worker.engine.errors import EngineError

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
REBUILD_HINT = "run `embedfleet model build`"

Pooling = Literal["mean", "cls"]


class BundleError(EngineError):
    """A model bundle is missing, incomplete or corrupt."""


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A model bundle's manifest.json: what the model is and how to run and pool it."""

    name: str
    # SHA-256 of the source weights (the safetensors file, or the imported ONNX file):
    # the identity of the model in cache keys, whatever variant serves it.
    fingerprint: str
    pooling: Pooling
    normalize: bool
    max_tokens: int
    dim: int
    # variant name ("fp32", "int8", "fp16") -> ONNX file name in the bundle.
    variants: dict[str, str]
    source: str
    builder_version: str
    matryoshka_dims: list[int] = msgspec.field(default_factory=list)
    # nomic-style Matryoshka models want a layer norm over the full vector before slicing.
    matryoshka_layer_norm: bool = False
    # task name -> prefix prepended to the text, e.g. {"query": "search_query: "}.
    prompts: dict[str, str] = msgspec.field(default_factory=dict)
    # file name -> SHA-256, checked when a variant is loaded (catches truncated copies).
    file_sha256: dict[str, str] = msgspec.field(default_factory=dict)
    quantization: str = ""
    # The int8 variant's weights stored as int8 instead of uint8 + 128: u8 x s8 GEMMs for CPUs
    # with VNNI or AMX (or AVX2, see below), the same vectors (worker.engine.cpu). Empty in
    # bundles built before.
    int8_s8_weights: str = ""
    # The largest |sum| of two same-sign adjacent int8 weights in the s8 file (quantize.s8_pair_sum):
    # at most 128, AVX2's u8 x s8 GEMM runs it exactly too (worker.engine.cpu). 0: not recorded
    # (bundles from before builder 5, whose s8 weights only VNNI or AMX run exactly).
    int8_s8_pair_sum: int = 0
    # Name of the graph output to pool (rank 3), or a pooled output (rank 2).
    output_name: str = "last_hidden_state"
    format_version: int = FORMAT_VERSION


def serving_fingerprint(manifest: Manifest, variant: str) -> str:
    """The model fingerprint that goes into content hashes for vectors served by ``variant``.

    Two workers may share cached vectors only if they would compute the same vectors, so this
    covers every input that changes one: the source weights, the variant's ONNX file (its
    quantization scheme), pooling, normalisation, max tokens, prompts and Matryoshka settings.
    An FP32 worker and an INT8 worker therefore never serve each other's vectors, and a rebuilt
    INT8 file with a new quantization scheme starts a fresh cache. The int8 variant's s8 weights
    are not part of it: they are the u8 file's weights re-encoded, giving the same vectors
    (worker.engine.cpu), so workers on CPUs with and without VNNI share one fingerprint.
    ``openvino-bf16`` and ``openvino-f32`` are the FP32 file compiled by OpenVINO in that precision.
    """
    filename = manifest.variants.get(variant, "")
    if variant.startswith("openvino-"):  # OpenVINO's precision on the FP32 file (openvino_backend)
        filename = manifest.variants.get("fp32", "")
    identity = {
        "weights": manifest.fingerprint,
        "variant": variant,
        "file_sha256": manifest.file_sha256.get(filename, ""),
        "pooling": manifest.pooling,
        "normalize": manifest.normalize,
        "max_tokens": manifest.max_tokens,
        "prompts": manifest.prompts,
        "matryoshka_layer_norm": manifest.matryoshka_layer_norm,
        "output_name": manifest.output_name,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Bundle:
    """A model bundle on disk: its manifest and its checked files."""

    path: Path
    manifest: Manifest

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def int8_weights(self) -> frozenset[str]:
        """The encodings of the int8 variant's weights this bundle has (worker.engine.cpu)."""
        if "int8" not in self.manifest.variants:
            return frozenset()
        return frozenset({"u8", "s8"} if self.manifest.int8_s8_weights else {"u8"})

    def variant_path(self, variant: str, int8_weights: str = "u8") -> Path:
        """Path of a variant's ONNX file (for int8, of the weights' encoding ``int8_weights``),
        checked against the manifest's SHA-256."""
        filename = self.manifest.variants.get(variant)
        if filename is None:
            raise BundleError(
                f"{self.path / MANIFEST_FILE}: no variant {variant!r} (has {sorted(self.manifest.variants)})"
            )
        if variant == "int8" and int8_weights == "s8":
            if not self.manifest.int8_s8_weights:
                raise BundleError(f"{self.path / MANIFEST_FILE}: no s8 INT8 weights: {REBUILD_HINT}")
            filename = self.manifest.int8_s8_weights
        file_path = self.path / filename
        if not file_path.is_file():
            raise BundleError(f"{file_path} is missing: {REBUILD_HINT}")
        expected = self.manifest.file_sha256.get(filename)
        if expected is not None and sha256_file(file_path) != expected:
            raise BundleError(f"{file_path} is corrupt (SHA-256 mismatch): {REBUILD_HINT}")
        return file_path


def default_bundle_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """``<home>/models/<name>``, home as worker.checkout.default_home finds it."""
    return default_home() / "models" / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path) -> Manifest:
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist: {REBUILD_HINT}")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: {REBUILD_HINT}")
    try:
        manifest = msgspec.json.decode(manifest_path.read_bytes(), type=Manifest)
    except msgspec.DecodeError as exc:
        raise BundleError(f"{manifest_path} is corrupt ({exc}): {REBUILD_HINT}") from exc
    if manifest.format_version > FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format {manifest.format_version} is newer than this engine "
            f"reads ({FORMAT_VERSION}); upgrade embedfleet or {REBUILD_HINT}"
        )
    bad_dims = [d for d in manifest.matryoshka_dims if not 0 < d <= manifest.dim]
    if bad_dims:
        raise BundleError(f"{manifest_path}: matryoshka_dims {bad_dims} outside 1..{manifest.dim}")
    return manifest


def write_manifest(path: Path, manifest: Manifest) -> None:
    (path / MANIFEST_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")


def load_bundle(path: Path | str) -> Bundle:
    """Read and validate a bundle directory (manifest, tokenizer, every variant file present)."""
    bundle_path = Path(path).expanduser()
    manifest = read_manifest(bundle_path)
    tokenizer_path = bundle_path / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise BundleError(f"{tokenizer_path} is missing: {REBUILD_HINT}")
    for filename in [*manifest.variants.values(), *filter(None, [manifest.int8_s8_weights])]:
        if not (bundle_path / filename).is_file():
            raise BundleError(f"{bundle_path / filename} is missing: {REBUILD_HINT}")
    return Bundle(bundle_path, manifest)
