"""Producer clients of embedfleet: send texts to the fleet, get their vectors back."""

from producer.cache import ModelContract
from producer.client import ChunkResult, Client, ClientStats, EmbedOutcome
from producer.config import ClientConfig
from producer.errors import EmbedBatchError, EmbeddingError, EmbedTimeout, TextFailure
from producer.kafka import ServiceUnavailable
from producer.sync import SyncClient, embed_sync

__all__ = [
    "ChunkResult",
    "Client",
    "ClientConfig",
    "ClientStats",
    "EmbedBatchError",
    "EmbedOutcome",
    "EmbedTimeout",
    "EmbeddingError",
    "ModelContract",
    "ServiceUnavailable",
    "SyncClient",
    "TextFailure",
    "embed_sync",
]
