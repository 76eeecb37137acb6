"""Producer clients of embedfleet: send texts to the fleet, get their vectors back."""

from producer.cache import ModelContract
from producer.client import Client, ClientStats
from producer.config import ClientConfig
from producer.errors import EmbedBatchError, EmbeddingError, EmbedTimeout, TextFailure
from producer.kafka import ServiceUnavailable
from producer.sync import SyncClient, embed_sync

__all__ = [
    "Client",
    "ClientConfig",
    "ClientStats",
    "EmbedBatchError",
    "EmbedTimeout",
    "EmbeddingError",
    "ModelContract",
    "ServiceUnavailable",
    "SyncClient",
    "TextFailure",
    "embed_sync",
]
