"""What the gateway does with a request's texts: the client's cache lookup, the misses to the fleet,
a bound on texts outstanding, and the outcomes as answers or domain errors (``gateway.errors``; the
HTTP edge, ``gateway.app``, decides what each is in HTTP).

The gateway computes nothing itself: the model contract the workers publish in Redis tells it the
fingerprint (for content hashes), the width and the Matryoshka widths; the fleet does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from producer.cache import ModelContract
from producer.client import ChunkResult, Client
from producer.errors import EmbeddingError, Vector
from producer.gateway.config import GatewayConfig
from producer.gateway.errors import (
    DeadlineExceeded,
    FleetFailed,
    NoFleet,
    Overloaded,
    RejectedText,
    UnknownModel,
    UnsupportedDimensions,
)
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.reaper import ReplyTopicReaper
from producer.kafka import ServiceUnavailable
from schemas import LongInputs

log = logging.getLogger(__name__)
NOT_CONNECTED = "not connected to Kafka yet: the gateway keeps retrying (its log says why)"
START_RETRY_S = 2.0


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: list[Vector]
    tokens: int  # tokens the model read, over all texts (0 for cache entries that predate counts)
    # Per text, None where not known: cut at the model's limit (pool, chunks: a window was), the
    # tokens read (over all windows), and its windows (long="chunks" only).
    truncated: list[bool | None] = field(default_factory=list)
    token_counts: list[int | None] = field(default_factory=list)
    chunks: list[list[ChunkResult] | None] = field(default_factory=list)


class EmbeddingService:
    """The fleet as the HTTP handlers see it: ``embed(texts)`` or a ``GatewayError``."""

    def __init__(self, client: Client, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics
        self.model_name = client.config.model_name
        self.outstanding = 0  # texts sent to the fleet and not yet answered
        self._started = False
        self._start_problem = "starting"
        self._runner: asyncio.Task[None] | None = None
        self._reaper: ReplyTopicReaper | None = None
        metrics.watch_replies(lambda: client.reply_counts)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects in the background: an unreachable Kafka makes the gateway answer 503 and
        retry, not exit (its readiness stays down meanwhile)."""
        self._runner = asyncio.create_task(self._connect(), name="embedfleet-gateway-connect")

    async def _connect(self) -> None:
        while True:
            try:
                await self.client.start()
            except (ServiceUnavailable, OSError) as exc:
                self._start_problem = str(exc)
                log.warning(
                    "the gateway cannot reach the fleet yet (%s); retrying in %.0fs", exc, START_RETRY_S
                )
                await asyncio.sleep(START_RETRY_S)
                continue
            break
        self._started = True
        self._start_problem = ""
        log.info("gateway connected; results come back on %s", self.client.config.reply_topic)
        self._reaper = ReplyTopicReaper(self.client, lease_s=self.config.lease_s, metrics=self.metrics)
        await self._reaper.run()

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self.client.close()

    async def readiness(self) -> str | None:
        """Why the gateway cannot serve now, or None when it can."""
        # In words only: /readyz and 503 bodies are read by anyone who reaches the port, so they
        # never carry a URL (a password may sit in one) or a raw client error; the log has those.
        if not self._started:
            return NOT_CONNECTED
        # Without its reply reader the gateway cannot answer; a reader that died is restarted.
        replies = self.client.reply_problem()
        if replies is not None:
            log.warning("results cannot be read: %s", replies)
            return "the reply reader is down: results cannot be read yet (it is restarted; the log says why)"
        if await self.client.model_contract() is None:
            return self._no_contract_message()
        return None

    def _no_contract_message(self) -> str:
        return (
            f"no worker has published the contract of model {self.model_name!r} in Redis: start "
            "`embedfleet worker`, or set EMBEDFLEET_MODEL_FINGERPRINT and EMBEDFLEET_MODEL_DIM"
        )

    # --- requests ------------------------------------------------------------------------------

    async def _published(self, model: str) -> ModelContract | None:
        # The configured model's read keeps its no-argument form (the client's own model).
        if model == self.model_name:
            return await self.client.model_contract()
        return await self.client.contract_of(model)

    async def contract(self, model: str | None = None) -> ModelContract:
        """The contract of ``model`` (default: the configured one), read once per request and
        passed along: NoFleet when the configured model has none yet, UnknownModel for any other
        model without one (the gateway serves every model whose contract the fleet publishes)."""
        name = model or self.model_name
        if not self._started:
            raise NoFleet(f"the embedding fleet is unavailable: {NOT_CONNECTED}")
        contract = await self._published(name)
        if contract is None or contract.dim is None:
            if name != self.model_name:
                raise self._unknown(name)
            raise NoFleet(self._no_contract_message())
        return contract

    async def check_model(self, model: str) -> None:
        """UnknownModel unless ``model`` is the configured one or has a published contract."""
        if model == self.model_name:
            return
        contract = await self._published(model) if self._started else None
        if contract is None or contract.dim is None:
            raise self._unknown(model)

    def _unknown(self, model: str) -> UnknownModel:
        return UnknownModel(
            f"The model '{model}' does not exist: no worker of this fleet has published its contract "
            f"(this server serves '{self.model_name}' and every model listed by GET /v1/models)"
        )

    async def models(self) -> list[str]:
        """The configured model first, then every other model whose contract is published."""
        published = await self.client.published_models() if self._started else None
        return [self.model_name, *sorted(set(published or ()) - {self.model_name})]

    @staticmethod
    def width(contract: ModelContract, dimensions: int | None) -> int | None:
        """The Matryoshka width to ask the fleet for (None: the model's own)."""
        if dimensions is None or dimensions == contract.dim:
            return None
        if dimensions in contract.dimensions:
            return dimensions
        offered = sorted({*contract.dimensions, *([contract.dim] if contract.dim else [])})
        raise UnsupportedDimensions(
            f"dimensions={dimensions} is not supported by this model: it offers {offered}"
        )

    async def embed(
        self,
        texts: Sequence[str],
        contract: ModelContract,
        dimensions: int | None,
        deadline: float,
        *,
        long: LongInputs = "truncate",
        overlap: int | None = None,
    ) -> Embedded:
        """Vectors for ``texts`` in order, by ``deadline`` (a ``time.monotonic()`` instant), keyed
        with ``contract`` (the request's, from ``contract()``); ``long``, ``overlap``: what the
        workers do with a text longer than the model reads (``Client.embed``)."""
        # The contract says which model: its keys, its cache entries and its requests topic.
        prepared = await self.client.prepare(
            texts,
            dimensions=dimensions,
            contract=contract,
            model=contract.name or None,
            long=long,
            overlap=overlap,
        )
        if prepared.plan.failures:
            # Nothing is sent when any text is hopeless: the whole request fails anyway.
            first = prepared.plan.failures[0]
            raise RejectedText(first.index, first.code, first.message, len(texts))
        misses = sum(len(entry.indices) for entry in prepared.misses)
        cached = len(texts) - misses
        model = contract.name or self.model_name
        if prepared.misses:
            wanted = len(prepared.misses)
            if self.outstanding + wanted > self.config.max_outstanding:
                self.metrics.rejected.labels("overloaded").inc()
                raise Overloaded(
                    f"this gateway has {self.outstanding} texts waiting for the fleet (limit "
                    f"{self.config.max_outstanding}): retry later, or add gateways and workers"
                )
            self.outstanding += wanted
            self.metrics.outstanding.set(self.outstanding)
            try:
                outcome = await self.client.complete(prepared, timeout=max(0.0, deadline - time.monotonic()))
            except ServiceUnavailable as exc:
                log.warning("the fleet is unavailable: %s", exc)
                raise NoFleet(
                    "the embedding fleet is unavailable (Kafka or Redis cannot be reached; the "
                    "gateway's log says which): retry shortly"
                ) from exc
            except EmbeddingError as exc:
                log.error("the gateway failed: %s", exc)
                raise FleetFailed("the gateway failed (its log says why)") from exc
            finally:
                self.outstanding -= wanted
                self.metrics.outstanding.set(self.outstanding)
            if outcome.missing:
                self.metrics.texts.labels("timed_out", model).inc(outcome.missing)
                raise DeadlineExceeded(
                    f"{outcome.missing} of {len(texts)} texts got no vector within "
                    f"{self.config.deadline_s:g}s: the fleet is not answering (are workers running "
                    "and keeping up?); retry later"
                )
            if outcome.failures:
                self.metrics.texts.labels("failed", model).inc(len(outcome.failures))
                first = outcome.failures[0]
                raise RejectedText(first.index, first.code, first.message, len(texts))
        self.metrics.texts.labels("cached", model).inc(cached)
        self.metrics.texts.labels("fleet", model).inc(len(texts) - cached)
        vectors = [v for v in prepared.vectors if v is not None]
        assert len(vectors) == len(texts)
        return Embedded(
            vectors,
            sum(t or 0 for t in prepared.tokens),
            list(prepared.truncated),
            list(prepared.tokens),
            list(prepared.chunks),
        )
