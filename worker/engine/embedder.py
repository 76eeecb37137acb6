"""The embedding engine: a model bundle + an inference session (ONNX Runtime, or OpenVINO for the
openvino variant) -> pooled, normalised vectors.

Importable on its own (no Kafka, no Redis). ``run`` may be called from several threads side by
side (the worker's inference threads, ``parallel_calls``); each call is parallelised with
``intra_op_threads``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from worker.engine.bundle import Bundle, BundleError, Manifest, load_bundle, serving_fingerprint
from worker.engine.cpu import CpuInfo, Int8Weights, choose_int8_weights, read_cpu
from worker.engine.cpu_graph import UNWANTED_FUSIONS
from worker.engine.errors import EngineError
from worker.engine.openvino_backend import OPENVINO_VARIANT, OpenVinoSession, openvino_precision
from worker.engine.tokenize import DEFAULT_TOKEN_BUDGET, Encoded, Span, TextTokenizer, TokenizedText

FloatArray = npt.NDArray[np.float32]
Device = Literal["cpu", "cuda"]
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class UnknownTaskError(EngineError, ValueError):
    """A task name the model declares no prompt for."""


class InvalidDimensionsError(EngineError, ValueError):
    """A ``dimensions`` value the model does not declare."""


class InjectedFault(EngineError):
    """Raised by ``Embedder.run`` when the fault-injection hook matches a batch (tests only)."""


@dataclass(frozen=True, slots=True)
class EmbedOutput:
    """Vectors for a list of texts, with whether each was truncated and its token count."""

    vectors: FloatArray  # [n, dim] float32, in input order
    truncated: list[bool]
    token_counts: list[int]


PADDING_SLACK_TOKENS = 8


def physical_cpu_count() -> int:
    """Physical cores this process may run on (hyper-threads add little to GEMM throughput)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores: set[str] = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            return max(1, len(allowed))
    return max(1, len(cores) or os.cpu_count() or 1)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Every batch has a new shape, so memory patterns would only pin buffers of old shapes.
    options.enable_mem_pattern = False
    # Keep the INT8 graphs' plain layer norms plain: ONNX Runtime's fused CPU kernel is slower.
    options.add_session_config_entry("optimization.disable_specified_optimizers", ",".join(UNWANTED_FUSIONS))
    return options


def run_options(low_memory: bool) -> ort.RunOptions:
    """With ``low_memory``, the CPU arena gives back its free chunks after every run.

    Measured (INT8, 2 cores, all 616 corpus docs, 16384-token budget): arena kept: 116-127
    docs/s, RSS 570-620 MB after; no arena at all: 52 docs/s (big buffers are mmap'd and
    page-faulted on every run), RSS 227 MB; arena + shrink after each run: 101 docs/s,
    RSS 168 MB after (peak ~530 MB during the largest batch). Queries are unaffected (~1200/s).
    """
    options = ort.RunOptions()
    if low_memory:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class Embedder:
    """Tokenize, run and pool with one bundle variant.

    ``fault_marker``: a fault-injection hook for tests, off by default. When set, ``run``
    raises ``InjectedFault`` if any text of the batch contains the marker (as a substring),
    so that a worker's batch-splitting and dead-letter path can be exercised end to end; with
    ``fault_kind="nan"`` it returns NaN vectors for those texts instead (an FP16 overflow).
    """

    def __init__(
        self,
        bundle: Bundle,
        session: ort.InferenceSession | OpenVinoSession,
        *,
        variant: str,
        device: Device,
        fault_marker: str | None = None,
        fault_kind: str = "raise",
        low_memory: bool = True,
        int8_weights: Int8Weights | None = None,
        cpu: CpuInfo | None = None,
    ) -> None:
        self.bundle = bundle
        self.variant = variant
        # The int8 variant's weight encoding loaded (None for other variants); the kernel that
        # runs; what the serving fingerprint names (the variant, and OpenVINO's precision).
        self.int8_weights = int8_weights
        self.serving_variant = variant
        if isinstance(session, OpenVinoSession):
            self.serving_variant = f"{variant}-{session.precision}"
            self.kernel = f"openvino {session.version}, {session.precision}"
        elif int8_weights is not None:
            self.kernel = (cpu or read_cpu()).int8_kernel(int8_weights)
        else:
            self.kernel = variant
        self.device = device
        self.fault_marker = fault_marker
        self.fault_kind = fault_kind
        self._session = session
        self._run_options = run_options(low_memory and device == "cpu")
        self._tokenizer = TextTokenizer.from_file(bundle.tokenizer_path, bundle.manifest.max_tokens)
        self._input_names = frozenset(i.name for i in session.get_inputs())
        outputs = {o.name for o in session.get_outputs()}
        if bundle.manifest.output_name not in outputs:
            raise BundleError(
                f"{bundle.variant_path(variant)}: no output {bundle.manifest.output_name!r} "
                f"(has {sorted(outputs)})"
            )

    @classmethod
    def from_bundle(
        cls,
        path: Path | str,
        variant: str | None = None,
        device: Device = "cpu",
        intra_op_threads: int | None = None,
        *,
        cuda_device_id: int = 0,
        low_memory: bool = True,
        fault_marker: str | None = None,
        fault_kind: str = "raise",
        int8_weights: str = "auto",
        parallel_calls: int = 1,
    ) -> Embedder:
        """Load a bundle. ``variant`` defaults to int8 on the CPU and fp16 on CUDA;
        ``intra_op_threads`` defaults to the physical cores available to this process;
        ``int8_weights`` (auto, u8, s8): the int8 variant's weight encoding
        (``worker.engine.cpu.choose_int8_weights``; auto is the exact and fastest one here);
        ``parallel_calls``: how many threads call ``run`` side by side (OpenVINO gives each a
        stream of its own; an ONNX Runtime session needs nothing for it)."""
        bundle = load_bundle(path)
        chosen = variant or ("fp16" if device == "cuda" else "int8")
        if chosen not in bundle.manifest.variants and variant is None:
            chosen = "fp32"  # an imported bundle may carry only fp32 / int8
        cpu = read_cpu()
        weights: Int8Weights | None = None
        if chosen == "int8":  # Int8WeightsError (an EngineError) where the choice cannot run here
            weights = choose_int8_weights(
                int8_weights, cpu, bundle.int8_weights, bundle.manifest.int8_s8_pair_sum
            )
        threads = intra_op_threads or physical_cpu_count()
        session: ort.InferenceSession | OpenVinoSession
        if chosen == OPENVINO_VARIANT:
            if device != "cpu":
                raise EngineError("variant openvino runs on the CPU; use variant fp16 on CUDA")
            # OpenVINO compiles the FP32 graph itself.
            session = _openvino_session(bundle.variant_path("fp32"), threads, cpu, parallel_calls)
        else:
            model_path = bundle.variant_path(chosen, weights or "u8")
            session = _onnxruntime_session(model_path, device, chosen, threads, cuda_device_id)
        return cls(
            bundle,
            session,
            variant=chosen,
            device=device,
            fault_marker=fault_marker,
            fault_kind=fault_kind,
            low_memory=low_memory,
            int8_weights=weights,
            cpu=cpu,
        )

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def model_fingerprint(self) -> str:
        """The fingerprint content hashes use: weights + this variant (see serving_fingerprint)."""
        return serving_fingerprint(self.bundle.manifest, self.serving_variant)

    @property
    def dim(self) -> int:
        return self.bundle.manifest.dim

    def prefix_for(self, task: str | None) -> str:
        if task is None:
            return ""
        prompts = self.manifest.prompts
        if task not in prompts:
            known = ", ".join(sorted(prompts)) or "none"
            raise UnknownTaskError(f"model {self.manifest.name} has no task {task!r} (tasks: {known})")
        return prompts[task]

    def check_dimensions(self, dimensions: int | None) -> int:
        """The output width for ``dimensions``; raises InvalidDimensionsError if undeclared."""
        if dimensions is None or dimensions == self.dim:
            return self.dim
        if dimensions not in self.manifest.matryoshka_dims:
            allowed = sorted({*self.manifest.matryoshka_dims, self.dim})
            raise InvalidDimensionsError(
                f"model {self.manifest.name} supports dimensions {allowed}, not {dimensions}"
            )
        return dimensions

    def tokenize(self, texts: Sequence[str], task: str | None = None) -> list[TokenizedText]:
        prefix = self.prefix_for(task)
        return self._tokenizer.tokenize([prefix + t for t in texts] if prefix else texts)

    def windows(self, text: str, task: str | None, overlap: int) -> list[Span]:
        """``text`` split into the windows a long-input request embeds (``long: pool/chunks``):
        each is read whole by the model with ``task``'s prompt before it (TextTokenizer.windows)."""
        prefix = self.prefix_for(task)
        reserved = self._tokenizer.content_tokens(prefix) if prefix else 0
        return self._tokenizer.windows(text, overlap=overlap, reserved=reserved)

    def prepare(self, texts: Sequence[str], task: str | None = None) -> Encoded:
        """Prefix, tokenize (truncating at max_tokens) and pad to the longest text."""
        return self._tokenizer.pad(self.tokenize(texts, task), texts)

    def count_tokens(self, texts: Sequence[str], task: str | None = None) -> list[int]:
        """Tokens per text after prefix and truncation, for a padded-token budget."""
        prefix = self.prefix_for(task)
        return self._tokenizer.count_tokens([prefix + t for t in texts] if prefix else texts)

    def run(self, encoded: Encoded, dimensions: int | None = None) -> FloatArray:
        """Model + pooling + Matryoshka truncation + L2 normalisation: float32 [n, dim]."""
        width = self.check_dimensions(dimensions)
        if len(encoded) == 0:
            return np.zeros((0, width), dtype=np.float32)
        marked = [self.fault_marker in t for t in encoded.texts] if self.fault_marker else []
        if any(marked) and self.fault_kind == "raise":
            raise InjectedFault(f"injected inference failure (marker {self.fault_marker!r})")
        output = self._infer(encoded)
        pooled = output if output.ndim == 2 else self._pool(output, encoded.attention_mask)
        vectors = self._finish(pooled.astype(np.float32, copy=False), width)
        if any(marked) and self.fault_kind == "nan":
            vectors[np.asarray(marked)] = np.nan
        return vectors

    def embed(
        self,
        texts: Sequence[str],
        task: str | None = None,
        dimensions: int | None = None,
        batch_size: int = 32,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> EmbedOutput:
        """Embed any number of texts: tokenize once, sort by length, cut batches by size and
        padded tokens (longest x count <= token_budget), and return vectors in input order."""
        tokenized = self.tokenize(texts, task)
        return self.embed_tokenized(tokenized, texts, dimensions, batch_size, token_budget)

    def embed_tokenized(
        self,
        tokenized: Sequence[TokenizedText],
        texts: Sequence[str],
        dimensions: int | None = None,
        batch_size: int = 32,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> EmbedOutput:
        """``embed`` for texts already tokenized by ``tokenize`` (the worker tokenizes once, when
        it decodes a request, and carries the ids here). ``texts`` are for diagnostics only."""
        width = self.check_dimensions(dimensions)
        vectors = np.zeros((len(tokenized), width), dtype=np.float32)
        for batch in plan_batches([len(t.ids) for t in tokenized], batch_size, token_budget):
            encoded = self._tokenizer.pad([tokenized[i] for i in batch], [texts[i] for i in batch])
            vectors[batch] = self.run(encoded, dimensions)
        return EmbedOutput(
            vectors=vectors,
            truncated=[t.truncated for t in tokenized],
            token_counts=[len(t.ids) for t in tokenized],
        )

    def _infer(self, encoded: Encoded) -> FloatArray:
        feeds = {"input_ids": encoded.input_ids}
        if "attention_mask" in self._input_names:
            feeds["attention_mask"] = encoded.attention_mask
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(encoded.input_ids)
        output_name = self.manifest.output_name
        if self.device == "cuda" and not isinstance(self._session, OpenVinoSession):
            binding = self._session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(output_name, "cpu")
            self._session.run_with_iobinding(binding, self._run_options)
            result: FloatArray = binding.copy_outputs_to_cpu()[0]
            return result
        outputs: list[FloatArray] = self._session.run([output_name], feeds, self._run_options)
        return outputs[0]

    def _pool(self, hidden: FloatArray, attention_mask: npt.NDArray[np.int64]) -> FloatArray:
        if self.manifest.pooling == "cls":
            return hidden[:, 0, :]
        mask = attention_mask.astype(hidden.dtype)
        summed: FloatArray = np.einsum("bsh,bs->bh", hidden, mask)
        mean: FloatArray = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        return mean

    def _finish(self, pooled: FloatArray, width: int) -> FloatArray:
        vectors = pooled
        if width != self.dim:
            if self.manifest.matryoshka_layer_norm:
                mean = vectors.mean(axis=1, keepdims=True)
                var = vectors.var(axis=1, keepdims=True)
                vectors = (vectors - mean) / np.sqrt(var + 1e-5)
            vectors = vectors[:, :width]
        if self.manifest.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        result: FloatArray = np.ascontiguousarray(vectors, dtype=np.float32)
        return result


def padding_allowed(longest: int) -> int:
    """Padding tokens a text may carry in a model call whose longest text has ``longest``: a
    quarter of it, or a few tokens (a call costs little more than its padded tokens, so padding
    is what a poor split wastes: random short queries padded to the longest of 32 cost about
    twice their own tokens)."""
    return max(PADDING_SLACK_TOKENS, longest // 4)


def plan_batches(token_counts: Sequence[int], batch_size: int, token_budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest texts first, each batch within ``batch_size``
    texts and ``token_budget`` padded tokens (a single text over the budget runs alone), and no
    text padded by more than ``padding_allowed`` of its batch's longest."""
    if batch_size < 1 or token_budget < 1:
        raise ValueError("batch_size and token_budget must be positive")
    order = sorted(range(len(token_counts)), key=lambda i: token_counts[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted longest first, so the batch's first text sets its padded length.
        longest = token_counts[current[0]] if current else token_counts[index]
        if current and (
            len(current) >= batch_size
            or longest * (len(current) + 1) > token_budget
            or longest - token_counts[index] > padding_allowed(longest)
        ):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _onnxruntime_session(
    model_path: Path, device: Device, variant: str, threads: int, cuda_device_id: int
) -> ort.InferenceSession:
    providers = _providers(device, variant, cuda_device_id)
    try:
        session = ort.InferenceSession(str(model_path), session_options(threads), providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph...)
        raise BundleError(
            f"{model_path} cannot be loaded by ONNX Runtime ({exc}); "
            "run `embedfleet model build` to rebuild the bundle"
        ) from exc
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        # ORT falls back to the CPU silently when CUDA/cuDNN libraries fail to load.
        raise EngineError(
            "device='cuda': ONNX Runtime could not initialise CUDAExecutionProvider "
            "(check the CUDA and cuDNN libraries matching onnxruntime-gpu)"
        )
    return session


def _openvino_session(model_path: Path, threads: int, cpu: CpuInfo, streams: int) -> OpenVinoSession:
    try:
        return OpenVinoSession(
            model_path, threads=threads, precision=openvino_precision(cpu), streams=streams
        )
    except EngineError:  # the runtime is not installed
        raise
    except Exception as exc:  # OpenVINO's own exception types
        raise BundleError(
            f"{model_path} cannot be compiled by OpenVINO ({exc}); "
            "run `embedfleet model build` to rebuild the bundle"
        ) from exc


def _providers(device: Device, variant: str, cuda_device_id: int) -> list[str | tuple[str, dict[str, str]]]:
    if device == "cpu":
        return [CPU_PROVIDER]
    if device != "cuda":
        raise EngineError(f"unknown device {device!r} (cpu or cuda)")
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise EngineError(
            "device='cuda' but this onnxruntime has no CUDAExecutionProvider: "
            "install the GPU build (pip install 'embedfleet[gpu]', which brings onnxruntime-gpu, "
            "instead of onnxruntime) or use device='cpu'"
        )
    if variant == "int8":
        raise EngineError("the int8 variant uses CPU-only kernels; use variant='fp16' on CUDA")
    return [(CUDA_PROVIDER, {"device_id": str(cuda_device_id)}), CPU_PROVIDER]
