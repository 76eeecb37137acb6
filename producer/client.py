"""The asyncio client: cache first, then Kafka for the misses, results awaited by request id.

One call of ``embed``:

1. keys every text by its content hash (``keys.py``) and merges identical texts (one request each);
2. reads all keys from the Redis cache in one pipelined round trip (fail open);
3. produces one request per miss to the model's requests topic (``embed.requests`` for the
   default model, ``embed.requests.<model>`` for the others: ``schemas.model_routing``; idempotent
   producer, acks=all), keyed by the content hash so identical texts meet on one partition and one worker;
4. awaits the results by request id on the reply topic, read by one background task.

Long inputs (``long``, issue 24): ``truncate`` (the default) cuts a text at the model's limit and
each result says whether it did (``EmbedOutcome.truncated``); ``pool`` and ``chunks`` have the
workers embed overlapping windows of the text and answer their token-weighted mean (and, for
``chunks``, every window's span and vector: ``EmbedOutcome.chunks``). Such requests carry the
schema header 2 (a worker built before long inputs refuses them rather than truncate), their keys
append the long spec (``schemas.long_inputs_spec``), and they skip the client's cache lookup: the
workers cache the windows, never a pooled vector under the request's key. A cache entry of a
truncate request that may have been cut (its token count is the model's limit, or unknown) is left
to the workers too, which say exactly whether they cut it.

Reply topics: ``private`` (default) creates ``embed.results.<client id>`` (1 partition) on start and
deletes it on close, so the client reads only its own results; ``shared`` reads all of
``embed.results`` from the end offsets taken on start (no topic admin rights needed, but every client
reads everyone's results); ``none`` only produces (``send``), results go to the workers' default topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from producer.cache import CacheReader, ModelContract, connect
from producer.config import ClientConfig
from producer.errors import EmbedBatchError, EmbedTimeout, TextFailure, Vector
from producer.kafka import (
    ServiceUnavailable,
    create_producer,
    create_topic,
    delete_topic,
    reply_consumer,
    unreachable,
)
from producer.keys import Distinct, Plan, plan_requests
from producer.replies import HEARTBEAT_HEADER, Expected, ReplyRouter
from schemas import (
    LONG_INPUTS,
    Chunk,
    EmbedRequest,
    EmbedResult,
    LongInputs,
    decode_vector_b64,
    encode_request,
    long_inputs_spec,
    request_headers,
)
from schemas.messages import WINDOW_OVERLAP_MAX

log = logging.getLogger(__name__)

# How long a known model contract is trusted before it is read again (a fleet may roll to a new
# model); an unknown one is retried sooner, since workers publish it when they start.
CONTRACT_REFRESH_S = 30.0
CONTRACT_RETRY_S = 1.0
PRODUCE_ATTEMPTS = 5
PRODUCE_BACKOFF_S = 0.1


@dataclass(slots=True)
class ClientStats:
    """Counters since the client started (texts are counted per position in the calls)."""

    produced: int = 0  # request messages produced
    cached: int = 0  # texts answered from the cache: the client's lookup or a worker's
    computed: int = 0  # texts a worker computed
    failed: int = 0  # texts answered with an error, or not answered in time


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """One window of a long text (``long="chunks"``): its span of the text in code points
    (``text[start:end]``), the tokens the model read for it and its float32 vector."""

    start: int
    end: int
    tokens: int
    vector: Vector


@dataclass(slots=True)
class Prepared:
    """A call after its cache lookup: what was found (by text position) and what is left."""

    plan: Plan
    task: str | None
    dimensions: int | None
    vectors: list[Vector | None]
    tokens: list[int | None]  # tokens the model read per text, where known
    misses: list[Distinct]  # distinct texts to send to the fleet
    # The contract the keys were computed with: complete() expects results of its width.
    contract: ModelContract | None
    model: str  # the model asked for: its requests topic gets the misses
    long: LongInputs = "truncate"  # what the workers do with a text longer than the model reads
    overlap: int | None = None  # tokens shared by consecutive windows (pool, chunks; None: 32)
    truncated: list[bool | None] = field(default_factory=list)  # text i was cut (None: not known)
    chunks: list[list[ChunkResult] | None] = field(default_factory=list)  # long="chunks" only

    def __post_init__(self) -> None:
        count = len(self.vectors)
        self.truncated.extend([None] * (count - len(self.truncated)))
        self.chunks.extend([None] * (count - len(self.chunks)))

    def fill(
        self,
        indices: list[int],
        vector: Vector,
        tokens: int | None,
        truncated: bool | None = None,
        chunks: list[ChunkResult] | None = None,
    ) -> None:
        # Repeated texts get copies, so changing one returned array never changes another.
        self.vectors[indices[0]] = vector
        self.chunks[indices[0]] = chunks
        for index in indices[1:]:
            self.vectors[index] = vector.copy()
            if chunks is not None:
                self.chunks[index] = [dataclasses.replace(c, vector=c.vector.copy()) for c in chunks]
        for index in indices:
            self.tokens[index] = tokens
            self.truncated[index] = truncated


@dataclass(frozen=True, slots=True)
class EmbedOutcome:
    """What ``Client.complete`` made of a call: ``vectors[i]`` is None where text i failed
    (``failures``, sorted by index) or got no result in time (``missing`` counts those).

    ``truncated[i]``: whether text i was cut at the model's limit (for pool and chunks: whether
    a window was), None where not known; ``tokens[i]`` counts the tokens read (over all windows
    for pool and chunks); ``chunks[i]``: every window of text i for ``long="chunks"``, else None.
    """

    vectors: list[Vector | None]
    tokens: list[int | None]
    failures: list[TextFailure]
    missing: int
    produced: int  # requests sent to the fleet (0: answered from the cache alone)
    truncated: list[bool | None] = field(default_factory=list)
    chunks: list[list[ChunkResult] | None] = field(default_factory=list)


def long_options(long: str, overlap: int | None) -> tuple[LongInputs, int | None]:
    """``long`` and ``overlap`` checked (``ValueError`` says what is wrong); the overlap is
    dropped for truncate, which has no windows."""
    if long not in LONG_INPUTS:
        raise ValueError(f"long must be one of {', '.join(LONG_INPUTS)}, not {long!r}")
    if overlap is not None and (
        isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= WINDOW_OVERLAP_MAX
    ):
        raise ValueError(f"overlap must be an int from 0 to {WINDOW_OVERLAP_MAX}, not {overlap!r}")
    return long, None if long == "truncate" else overlap


def cache_truncation(tokens: int | None, contract: ModelContract | None) -> bool | None:
    """What a cache entry's token count says of truncation: False when the text read fewer tokens
    than the model's limit; None when it cannot tell (the count or the limit unknown, or the count
    at the limit: cut, or exactly that long)."""
    limit = contract.max_tokens if contract is not None else None
    if tokens is None or limit is None or tokens >= limit:
        return None
    return False


def chunk_results(chunks: list[Chunk] | None, width: int) -> list[ChunkResult] | None:
    """A result's ``chunks`` with float32 vectors; ``ValueError`` for a chunk without a vector or
    of another width than the result's."""
    if chunks is None:
        return None
    results = []
    for chunk in chunks:
        if chunk.vector_b64 is not None:
            vector = decode_vector_b64(chunk.vector_b64)
        elif chunk.vector is not None:
            vector = np.asarray(chunk.vector, dtype=np.float32)
        else:
            raise ValueError("a chunk carries no vector")
        if vector.shape != (width,):
            raise ValueError(f"a chunk of width {vector.shape[0]}, not {width}")
        results.append(ChunkResult(chunk.start, chunk.end, chunk.tokens, vector))
    return results


class Client:
    """``async with Client() as client: vectors = await client.embed(texts)``."""

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = ClientConfig.from_env(**overrides)
        elif overrides:
            if "model_name" in overrides and "requests_topic" not in overrides:
                overrides["requests_topic"] = ""  # the new model's topic, by the naming rule
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.stats = ClientStats()
        self._cache = CacheReader(
            connect(config) if config.use_cache else None,
            prefix=config.cache_key_prefix,
            model_name=config.model_name,
        )
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._router: ReplyRouter | None = None
        self._created_topic: str | None = None
        # model name -> (its contract or None, when it was read)
        self._contracts: dict[str, tuple[ModelContract | None, float]] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        config = self.config
        try:
            await self.model_contract()
            self._producer = create_producer(config)
            try:
                await self._producer.start()
            except KafkaConnectionError as exc:
                raise unreachable(config, exc) from exc
            topic = config.reply_topic
            if topic is None:
                return
            if config.reply_mode == "private":
                await create_topic(config, topic)
                self._created_topic = topic
                # Waits until the brokers' metadata lists the new topic, so the reader finds it at once.
                partitions = await self._producer.partitions_for(topic)
            else:
                partitions = await self._producer.partitions_for(topic)
            self._consumer = await reply_consumer(
                config, topic, partitions, from_end=config.reply_mode == "shared"
            )
            # Where each partition starts: the router puts partitions back there after a fetch
            # that failed on a record it cannot unpack (see producer.replies).
            positions = {tp: await self._consumer.position(tp) for tp in self._consumer.assignment()}
            self._router = ReplyRouter(self._consumer, positions)
            self._router.start()
        except BaseException:
            await self.close()
            raise

    @property
    def mismatched_results(self) -> int:
        """Results that carried a waiting request's id but not its content hash or width (ignored:
        forged, or a bug); see ``producer.replies``."""
        return self._router.mismatched if self._router is not None else 0

    def reply_problem(self) -> str | None:
        """Why results cannot be read now (None: they can, or this client reads none); a reply
        reader that died is started again (see ``producer.replies``)."""
        return self._router.check() if self._router is not None else None

    @property
    def reply_counts(self) -> dict[str, int]:
        """Reply-topic records skipped since start, by reason, and reader restarts."""
        router = self._router
        if router is None:
            return {"unreadable": 0, "undecodable": 0, "mismatched": 0, "restarts": 0}
        return {
            "unreadable": router.unreadable,
            "undecodable": router.undecodable,
            "mismatched": router.mismatched,
            "restarts": router.restarts,
        }

    async def send_heartbeat(self) -> None:
        """Writes a record that readers skip to this client's private reply topic: it shows the
        topic's owner is alive (see ``producer.gateway.reaper``)."""
        if self._producer is None or self._created_topic is None:
            raise RuntimeError("send_heartbeat() needs a started client with a private reply topic")
        await self._producer.send_and_wait(self._created_topic, b"", headers=[(HEARTBEAT_HEADER, b"1")])

    async def close(self) -> None:
        if self._router is not None:
            await self._router.stop()
            self._router = None
        if self._consumer is not None:
            with contextlib.suppress(KafkaError):
                await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                await self._producer.stop()
            self._producer = None
        if self._created_topic is not None:
            try:
                await delete_topic(self.config, self._created_topic)
            except KafkaError as exc:
                log.warning("could not delete the reply topic %s: %s", self._created_topic, exc)
            self._created_topic = None
        await self._cache.close()

    # --- the model contract --------------------------------------------------------------------

    async def model_contract(self, model: str | None = None) -> ModelContract | None:
        """The fingerprint (and dim) that content hashes need, of ``model`` (default: the
        configured one): from the config (the configured model only), else from Redis."""
        return await self.contract_of(model or self.config.model_name)

    async def contract_of(self, name: str) -> ModelContract | None:
        """``model_contract`` of the model ``name``, read again at most every 30 s."""
        loop = asyncio.get_running_loop()
        known, read_at = self._contracts.get(name, (None, float("-inf")))
        if loop.time() - read_at < (CONTRACT_REFRESH_S if known is not None else CONTRACT_RETRY_S):
            return known
        published = await self._cache.read_contract(name) if self._cache.enabled else None
        if self.config.model_fingerprint and name == self.config.model_name:
            dim = self.config.model_dim
            same_model = published is not None and published.fingerprint == self.config.model_fingerprint
            if dim is None and same_model and published is not None:
                dim = published.dim
            # The model's limit, when the fleet serves this very model: it tells cut texts apart.
            max_tokens = published.max_tokens if same_model and published is not None else None
            known = ModelContract(
                fingerprint=self.config.model_fingerprint, dim=dim, name=name, max_tokens=max_tokens
            )
        elif published is not None:
            known = published
        self._contracts[name] = (known, loop.time())
        return known

    async def published_models(self) -> list[str] | None:
        """Every model whose contract the fleet has published (None: Redis cannot be read)."""
        return await self._cache.published_models() if self._cache.enabled else None

    # --- embedding -----------------------------------------------------------------------------

    # The timeout is a parameter (not asyncio.timeout) because it decides what EmbedTimeout reports.
    async def embed(
        self,
        texts: Sequence[str],
        *,
        task: str | None = None,
        dimensions: int | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109
        model: str | None = None,
        long: LongInputs = "truncate",
        overlap: int | None = None,
    ) -> list[Vector]:
        """One float32 vector per text, in order, from ``model`` (default: the configured one).

        ``long``: what the workers do with a text longer than the model reads: ``truncate`` (cut
        it at the limit), ``pool`` (the token-weighted mean of windows overlapping by ``overlap``
        tokens, 32 by default) or ``chunks`` (that mean; the windows themselves come with
        ``prepare`` and ``complete``: ``EmbedOutcome.chunks``).

        Raises ``EmbedBatchError`` when some texts failed (the others' vectors are on it) and
        ``EmbedTimeout`` when results were still missing after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        prepared = await self.prepare(
            texts, task=task, dimensions=dimensions, model=model, long=long, overlap=overlap
        )
        outcome = await self.complete(prepared, timeout=max(0.0, deadline - loop.time()))
        if outcome.missing:
            raise EmbedTimeout(outcome.missing, len(texts), timeout, outcome.vectors, outcome.failures)
        if outcome.failures:
            raise EmbedBatchError(outcome.failures, outcome.vectors)
        return [v for v in outcome.vectors if v is not None]

    async def prepare(
        self,
        texts: Sequence[str],
        *,
        task: str | None = None,
        dimensions: int | None = None,
        contract: ModelContract | None = None,
        model: str | None = None,
        long: LongInputs = "truncate",
        overlap: int | None = None,
    ) -> Prepared:
        """Step one of ``embed``: content hashes and the cache lookup (one round trip). What is
        left to compute is ``Prepared.misses``; ``complete`` sends them and awaits the results.
        ``contract``: one the caller already read for this call (else it is read here); ``model``:
        which of the fleet's models (default: the configured one); its contract keys the texts,
        its cache entries answer them and its requests topic gets the misses. ``long`` and
        ``overlap``: see ``embed`` (``ValueError`` for a value no worker accepts); pool and chunks
        skip the lookup (the workers never cache a pooled vector under the request's key)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not one str (wrap it in a list)")
        long, overlap = long_options(long, overlap)
        name = model or self.config.model_name
        if contract is None:
            contract = await self.contract_of(name)
        plan = plan_requests(
            texts,
            fingerprint=contract.fingerprint if contract else None,
            task=task,
            dimensions=dimensions,
            long_spec=long_inputs_spec(long, overlap),
        )
        prepared = Prepared(
            plan,
            task,
            dimensions,
            [None] * len(texts),
            [None] * len(texts),
            [],
            contract,
            name,
            long=long,
            overlap=overlap,
        )
        dim = dimensions or (contract.dim if contract else None)
        if long != "truncate" or not (plan.keyed_by_content_hash and dim and self._cache.enabled):
            prepared.misses.extend(plan.distinct)
            return prepared
        found = await self._cache.lookup([entry.key for entry in plan.distinct], dim, name)
        for entry, cached in zip(plan.distinct, found, strict=True):
            truncated = None if cached is None else cache_truncation(cached.tokens, contract)
            # An entry that may be of a cut text is left to the workers (they know): with the
            # model's limit known, truncation is never left unsaid.
            if cached is None or (truncated is None and contract is not None and contract.max_tokens):
                prepared.misses.append(entry)
            else:
                prepared.fill(entry.indices, cached.vector, cached.tokens, truncated)
                self.stats.cached += len(entry.indices)
        return prepared

    # The timeout is a parameter (not asyncio.timeout): what did not arrive in time is reported.
    async def complete(self, prepared: Prepared, *, timeout: float = 30.0) -> EmbedOutcome:  # noqa: ASYNC109
        """Step two of ``embed``: produce the misses and await their results for ``timeout``
        seconds. Per-text failures and texts still missing are reported, not raised; Kafka being
        unreachable raises ``ServiceUnavailable``."""
        if self._router is None:
            raise RuntimeError("embed() needs a started client with reply_mode 'private' or 'shared'")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        plan = prepared.plan
        failures = list(plan.failures)
        requests = [(uuid.uuid4().hex, entry) for entry in prepared.misses]
        contract = prepared.contract
        width = prepared.dimensions or (contract.dim if contract is not None else None)
        futures = {
            request_id: self._router.expect(
                request_id, Expected(key=entry.key if plan.keyed_by_content_hash else None, dim=width)
            )
            for request_id, entry in requests
        }
        try:
            await asyncio.wait_for(
                self._produce(
                    requests,
                    prepared.task,
                    prepared.dimensions,
                    self.config.reply_topic,
                    prepared.model,
                    prepared.long,
                    prepared.overlap,
                ),
                max(0.0, deadline - loop.time()),
            )
            if futures:
                await asyncio.wait(futures.values(), timeout=max(0.0, deadline - loop.time()))
        except TimeoutError:
            pass
        finally:
            self._router.forget([rid for rid, future in futures.items() if not future.done()])
        missing = 0
        for request_id, entry in requests:
            future = futures[request_id]
            if not future.done() or future.cancelled():
                missing += len(entry.indices)
                continue
            self._record(future.result(), entry, prepared, failures)
        self.stats.failed += len(plan.failures) + missing
        failures.sort(key=lambda f: f.index)
        return EmbedOutcome(
            prepared.vectors,
            prepared.tokens,
            failures,
            missing,
            len(requests),
            prepared.truncated,
            prepared.chunks,
        )

    async def send(
        self,
        texts: Sequence[str],
        *,
        task: str | None = None,
        dimensions: int | None = None,
        model: str | None = None,
        long: LongInputs = "truncate",
        overlap: int | None = None,
    ) -> list[str | None]:
        """Fire and forget: produce the misses and return each text's request id (``long``,
        ``overlap``: see ``embed``).

        None marks a text the cache answered or that could not be sent (see ``stats``). Results go to
        the reply topic of this client's mode (the workers' default topic in mode ``none``).
        """
        if self._producer is None:
            raise RuntimeError("send() needs a started client")
        prepared = await self.prepare(
            texts, task=task, dimensions=dimensions, model=model, long=long, overlap=overlap
        )
        self.stats.failed += len(prepared.plan.failures)
        requests = [(uuid.uuid4().hex, entry) for entry in prepared.misses]
        reply_to = self.config.reply_topic if self.config.reply_mode == "private" else None
        await self._produce(
            requests, task, dimensions, reply_to, prepared.model, prepared.long, prepared.overlap
        )
        ids: list[str | None] = [None] * len(texts)
        for request_id, entry in requests:
            for index in entry.indices:
                ids[index] = request_id
        return ids

    def _record(
        self, result: EmbedResult, entry: Distinct, prepared: Prepared, failures: list[TextFailure]
    ) -> None:
        if result.error is not None:
            failures.extend(TextFailure(i, result.error.code, result.error.message) for i in entry.indices)
            self.stats.failed += len(entry.indices)
            return
        try:
            vector = result.vector_array()
            chunks = chunk_results(result.chunks, vector.shape[0]) if prepared.long == "chunks" else None
        except ValueError as exc:
            failures.extend(TextFailure(i, "invalid_result", str(exc)) for i in entry.indices)
            self.stats.failed += len(entry.indices)
            return
        prepared.fill(entry.indices, vector, result.tokens, result.truncated, chunks)
        if result.cached:
            self.stats.cached += len(entry.indices)
        else:
            self.stats.computed += len(entry.indices)

    async def _produce(
        self,
        requests: list[tuple[str, Distinct]],
        task: str | None,
        dimensions: int | None,
        reply_to: str | None,
        model: str,
        long: LongInputs = "truncate",
        overlap: int | None = None,
    ) -> None:
        """Produces every request and waits for the broker's acks, retrying transient failures."""
        assert self._producer is not None
        # Pool and chunks: schema 2, which a worker built before long inputs refuses.
        headers = request_headers(long_inputs=long != "truncate")
        pending = [
            (
                entry.key.encode(),
                encode_request(
                    EmbedRequest(
                        id=request_id,
                        text=entry.text,
                        task=task,
                        dimensions=dimensions,
                        encoding_format="base64",
                        reply_to=reply_to,
                        long=long,
                        overlap=overlap,
                    ),
                    limits=None,
                ),
            )
            for request_id, entry in requests
        ]
        topic = self.config.requests_topic_of(model)
        for attempt in range(1, PRODUCE_ATTEMPTS + 1):
            deliveries = [
                await self._producer.send(topic, value, key=key, headers=headers) for key, value in pending
            ]
            outcomes = await asyncio.gather(*deliveries, return_exceptions=True)
            failed: list[tuple[bytes, bytes]] = []
            for message, outcome in zip(pending, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    self.stats.produced += 1
                elif isinstance(outcome, KafkaError) and outcome.retriable and attempt < PRODUCE_ATTEMPTS:
                    failed.append(message)
                else:
                    raise ServiceUnavailable(
                        f"could not produce to {topic!r} on {self.config.kafka_bootstrap}: {outcome!r}; "
                        "does the topic exist (`embedfleet stack up` creates it)?"
                    ) from outcome
            if not failed:
                return
            log.warning("%d requests failed to produce (attempt %d); retrying", len(failed), attempt)
            await asyncio.sleep(PRODUCE_BACKOFF_S * 2 ** (attempt - 1))
            pending = failed
