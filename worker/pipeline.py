"""One micro-batch from jobs to results: dedup, cache lookup, model on the misses, cache populate.

The model runs in dedicated threads (ONNX Runtime releases the GIL), so while it works on one
batch the event loop fetches, decodes and looks up the next. An inference failure is
isolated by splitting the failing group in halves until the poison texts stand alone; they get
``inference_failed``, everything else in the batch is answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from schemas import Chunk, ErrorCode, encode_success_result, encode_vector_b64
from worker.cache import VectorCache
from worker.engine.embedder import plan_batches
from worker.engine.tokenize import DEFAULT_TOKEN_BUDGET, Span, TokenizedText
from worker.health import ModelCalls
from worker.jobs import Answer, Job, Rejection, Window
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float32]


class EmbedOutputLike(Protocol):
    @property
    def vectors(self) -> FloatArray: ...
    @property
    def truncated(self) -> list[bool]: ...


class EmbeddingBackend(Protocol):
    """What the pipeline needs of the engine (worker.engine.Embedder satisfies it): vectors for
    texts the decoder already tokenized (``texts`` only for diagnostics)."""

    def embed_tokenized(
        self,
        tokenized: Sequence[TokenizedText],
        texts: Sequence[str],
        dimensions: int | None = None,
        batch_size: int = 32,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> EmbedOutputLike: ...


class ModelDescription(Protocol):
    """What the worker reads of the model's manifest (worker.engine.bundle.Manifest has it)."""

    @property
    def name(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def prompts(self) -> Mapping[str, str]: ...
    @property
    def matryoshka_dims(self) -> Sequence[int]: ...


class Engine(EmbeddingBackend, Protocol):
    """The model as the worker is wired to it (worker.engine.Embedder satisfies it): a contract to
    publish, a tokenizer for the decoder, and vectors for the pipeline."""

    @property
    def manifest(self) -> ModelDescription: ...
    @property
    def model_fingerprint(self) -> str: ...
    def tokenize(self, texts: Sequence[str], task: str | None = None) -> list[TokenizedText]: ...
    def windows(self, text: str, task: str | None, overlap: int) -> list[Span]: ...


@dataclass(slots=True)
class BatchOutcome:
    """What the pipeline made of a batch's jobs."""

    results: list[Answer] = field(default_factory=list)
    failures: list[Rejection] = field(default_factory=list)
    # How each result was served: "cached", "deduplicated" (same text earlier in the batch) or
    # "computed". The worker counts every outcome in one place (worker.app), with the rejections.
    served: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Computed:
    vectors: dict[str, FloatArray] = field(default_factory=dict)
    truncated: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # key -> error message


class BatchProcessor:
    """Dedup, cache lookup, the model for the misses (in the inference thread), cache store."""

    def __init__(
        self,
        *,
        backend: EmbeddingBackend,
        cache: VectorCache,
        metrics: WorkerMetrics,
        model_name: str,
        inference_batch_size: int,
        token_budget: int,
        inference_threads: int = 1,
        looked_up_at_intake: bool = False,
        model_calls: ModelCalls | None = None,
    ) -> None:
        self._backend = backend
        # Each model call is timed while it runs, for /healthz (worker.health.ModelCalls).
        self._model_calls = model_calls or ModelCalls(stall_s=0)
        # The hit lane (worker.hits) looked every job up already and counted it: looking the
        # misses up again here finds what was computed meanwhile, counting only those hits.
        self._count_lookups = not looked_up_at_intake
        self._cache = cache
        self._metrics = metrics
        self._model_name = model_name
        self._inference_batch_size = inference_batch_size
        self._token_budget = token_budget
        # Usually one thread, the model using every core; or several single-threaded runs side by
        # side (EMBEDFLEET_INFERENCE_THREADS), which the event loop's own work disturbs less.
        self._executor = ThreadPoolExecutor(max_workers=inference_threads, thread_name_prefix="inference")

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def process(self, jobs: Sequence[Job]) -> BatchOutcome:
        # What the cache and the model see: each job's text, or each window of a long input.
        texts = [text for job in jobs for text in _texts_of(job)]
        unique: dict[str, _Text] = {}
        for text in texts:
            unique.setdefault(text.key, text)
        self._metrics.batch_duplicates.inc(len(texts) - len(unique))

        representatives = list(unique.values())
        found = await self._cache.lookup(
            [(t.key, t.dim) for t in representatives], count_lookups=self._count_lookups
        )
        cached = {t.key: v for t, v in zip(representatives, found, strict=True) if v is not None}
        misses = [t for t in representatives if t.key not in cached]

        computed = _Computed()
        if misses:
            started = time.perf_counter()
            computed = await self._compute(misses)
            self._metrics.inference_seconds.observe(time.perf_counter() - started)
            self._metrics.computed_texts.inc(len(computed.vectors))
            self._metrics.truncated_texts.inc(len(computed.truncated))
            tokens = {text.key: len(text.tokens.ids) for text in misses}
            await self._cache.store(
                [(key, vector, tokens[key]) for key, vector in computed.vectors.items()], self._model_name
            )

        outcome = BatchOutcome()
        first_of_key: set[str] = set()
        for job in jobs:
            if job.windows is not None:
                self._answer_long_input(job, cached, computed, first_of_key, outcome)
                continue
            if job.key in computed.failed:
                outcome.failures.append(job.rejected(ErrorCode.INFERENCE_FAILED, computed.failed[job.key]))
                continue
            from_cache = job.key in cached
            vector = cached[job.key] if from_cache else computed.vectors[job.key]
            outcome.served[_served_as(job.key, from_cache, first_of_key)] += 1
            # Tokens and truncation are known for every job (it was tokenized when decoded).
            read = job.tokenized
            outcome.results.append(self._answer(job, vector, from_cache, read.truncated, len(read.ids)))
        return outcome

    def _answer(
        self,
        job: Job,
        vector: FloatArray,
        cached: bool,
        truncated: bool,
        tokens: int,
        windows: int | None = None,
        chunks: list[Chunk] | None = None,
    ) -> Answer:
        # Every vector here is finite: the cache's entries were checked when read, the model's
        # once per call (_compute_isolating).
        request = job.request
        encoded = encode_success_result(
            request_id=request.id,
            key=job.key,
            model=self._model_name,
            vector=vector,
            encoding_format=request.encoding_format,
            cached=cached,
            truncated=truncated,
            tokens=tokens,
            metadata=request.metadata,
            content_type=job.content_type,
            windows=windows,
            chunks=chunks,
        )
        return job, encoded

    def _answer_long_input(
        self,
        job: Job,
        cached: Mapping[str, FloatArray],
        computed: _Computed,
        first_of_key: set[str],
        outcome: BatchOutcome,
    ) -> None:
        """A long input's result, once every window of it has its vector (all in this batch): the
        token-weighted mean of the windows' vectors, re-normalised, and for ``chunks`` each
        window's vector and span. One failed window fails the request."""
        windows = job.windows or ()
        failed = next((computed.failed[w.key] for w in windows if w.key in computed.failed), None)
        if failed is not None:
            outcome.failures.append(job.rejected(ErrorCode.INFERENCE_FAILED, failed))
            return
        vectors = [cached[w.key] if w.key in cached else computed.vectors[w.key] for w in windows]
        weights = np.asarray([len(w.tokens.ids) for w in windows], dtype=np.float64)
        pooled = pool_windows(vectors, weights)
        all_cached = all(w.key in cached for w in windows)
        for window in windows:
            first_of_key.add(window.key)
        outcome.served["cached" if all_cached else "computed"] += 1
        self._metrics.long_inputs.labels(job.request.long).inc()
        self._metrics.windows.inc(len(windows))
        chunks = None
        if job.request.long == "chunks":
            chunks = [
                window_chunk(w, vector, job.request.encoding_format)
                for w, vector in zip(windows, vectors, strict=True)
            ]
        truncated = any(w.tokens.truncated for w in windows)
        outcome.results.append(
            self._answer(job, pooled, all_cached, truncated, int(weights.sum()), len(windows), chunks)
        )

    async def _compute(self, misses: Sequence[_Text]) -> _Computed:
        """The misses in model calls of at most the inference batch size and token budget, each
        length-sorted (worker.engine.embedder.plan_batches), spread over every inference thread: a batch
        that grew while the model was busy is done in the time of its share, not of all of it,
        and the next batch stays small (at moderate load that keeps latency near one call's)."""
        groups: dict[tuple[str | None, int | None], list[_Text]] = defaultdict(list)
        for text in misses:
            groups[(text.task, text.dimensions)].append(text)
        loop = asyncio.get_running_loop()
        calls = []
        for (task, dimensions), group in groups.items():
            counts = [len(text.tokens.ids) for text in group]
            for indices in plan_batches(counts, self._inference_batch_size, self._token_budget):
                call = [group[i] for i in indices]
                calls.append(loop.run_in_executor(self._executor, self._compute_call, call, task, dimensions))
        computed = _Computed()
        for part in await asyncio.gather(*calls):
            computed.vectors.update(part.vectors)
            computed.truncated |= part.truncated
            computed.failed.update(part.failed)
        return computed

    # --- in the inference thread ---------------------------------------------------------------

    def _compute_call(self, jobs: Sequence[_Text], task: str | None, dimensions: int | None) -> _Computed:
        computed = _Computed()
        with self._model_calls.running():
            self._compute_isolating(jobs, task, dimensions, computed)
        return computed

    def _compute_isolating(
        self, jobs: Sequence[_Text], task: str | None, dimensions: int | None, computed: _Computed
    ) -> None:
        try:
            output = self._backend.embed_tokenized(
                [j.tokens for j in jobs],
                [j.text for j in jobs],
                dimensions=dimensions,
                batch_size=self._inference_batch_size,
                token_budget=self._token_budget,
            )
        except Exception as exc:  # any engine failure: isolate the texts that cause it
            if len(jobs) == 1:
                log.warning("inference failed for request %s: %s", jobs[0].request_id, exc)
                computed.failed[jobs[0].key] = f"inference failed: {type(exc).__name__}: {exc}"
                return
            middle = len(jobs) // 2
            self._compute_isolating(jobs[:middle], task, dimensions, computed)
            self._compute_isolating(jobs[middle:], task, dimensions, computed)
            return
        finite: list[bool] = np.asarray(np.isfinite(output.vectors).all(axis=1)).tolist()
        for job, vector, truncated, ok in zip(jobs, output.vectors, output.truncated, finite, strict=True):
            if not ok:
                # An FP16 overflow or a broken model: never cached, never published.
                log.warning("inference gave a non-finite vector for request %s", job.request_id)
                computed.failed[job.key] = "inference failed: the model gave a non-finite vector"
                continue
            computed.vectors[job.key] = vector
            if truncated:
                computed.truncated.add(job.key)


@dataclass(frozen=True, slots=True)
class _Text:
    """One text for the cache and the model: a request's own, or a window of a long input."""

    key: str
    dim: int
    tokens: TokenizedText
    task: str | None
    dimensions: int | None
    text: str  # for diagnostics (the model reads ``tokens``)
    request_id: str


def _texts_of(job: Job) -> list[_Text]:
    request = job.request
    if job.windows is None:
        return [
            _Text(job.key, job.dim, job.tokenized, request.task, request.dimensions, request.text, request.id)
        ]
    return [
        _Text(
            w.key,
            job.dim,
            w.tokens,
            request.task,
            request.dimensions,
            request.text[w.start : w.end],
            request.id,
        )
        for w in job.windows
    ]


def _served_as(key: str, from_cache: bool, first_of_key: set[str]) -> str:
    if from_cache:
        label = "cached"
    elif key in first_of_key:
        label = "deduplicated"
    else:
        label = "computed"
    first_of_key.add(key)
    return label


def pool_windows(vectors: Sequence[FloatArray], weights: npt.NDArray[np.float64]) -> FloatArray:
    """The windows' token-weighted mean, re-normalised (each window vector is unit length, so
    the mean is shorter where windows disagree; its direction is what the pooled vector says)."""
    mean = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def window_chunk(window: Window, vector: FloatArray, encoding_format: str) -> Chunk:
    if encoding_format == "base64":
        return Chunk(
            start=window.start,
            end=window.end,
            tokens=len(window.tokens.ids),
            vector_b64=encode_vector_b64(vector),
        )
    return Chunk(start=window.start, end=window.end, tokens=len(window.tokens.ids), vector=vector.tolist())
