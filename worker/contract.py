"""The served model's contract in Redis: published before the worker joins its group, refused when
the fleet already serves another serving fingerprint of the model (clients compute content hashes
from the published contract, so one fleet serves one fingerprint)."""

from __future__ import annotations

import logging
from typing import Protocol

from schemas.cache_layout import ModelContract
from worker.errors import ContractMismatch

log = logging.getLogger(__name__)


class ContractStore(Protocol):
    """What publishing asks of the cache (worker.cache.VectorCache has it)."""

    async def ping(self) -> bool: ...
    async def published_fingerprint(self, name: str) -> str | None: ...
    async def publish_model(self, name: str, fields: dict[str, str]) -> bool: ...


class ContractPublisher:
    def __init__(self, store: ContractStore, model: ModelContract, *, replace: bool, served_as: str) -> None:
        self._store = store
        self._model = model
        self._replace = replace
        self._served_as = served_as  # how this worker serves the model, for the refusal's message
        self.published = False

    async def publish(self) -> None:
        """Publishes the contract; refuses (ContractMismatch) when the fleet already serves another
        fingerprint of this model, unless told to replace it. Without Redis there is nothing to
        check against: nothing happens (the runtime tries again once the cache answers)."""
        if not await self._store.ping():
            return
        model = self._model
        published = await self._store.published_fingerprint(model.name)
        if published is not None and published != model.fingerprint:
            if not self._replace:
                raise ContractMismatch(
                    f"the fleet serves model {model.name} with serving fingerprint "
                    f"{published[:12]}..., this worker {model.fingerprint[:12]}... ({self._served_as}): "
                    "clients compute content hashes from the published contract, so one fleet "
                    "serves one fingerprint. Start this worker with the fleet's variant and bundle, "
                    "or, to move the fleet to this one, start it with "
                    "EMBEDFLEET_ON_CONTRACT_MISMATCH=replace and stop the old workers"
                )
            log.warning(
                "replacing the published contract of %s (fingerprint %s... -> %s...): stop the "
                "workers that serve the old one",
                model.name,
                published[:12],
                model.fingerprint[:12],
            )
        self.published = await self._store.publish_model(model.name, model.redis_fields())
