"""The HTTP gateway: OpenAI's ``/v1/embeddings`` (and the seed's ``/embed``) in front of the fleet.

An upstream producer like the clients: it reads the cache, sends the misses to ``embed.requests``
and awaits their results on its own reply topic. ``embedfleet gateway`` runs it.
"""

from producer.gateway.app import create_app, serve
from producer.gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app", "serve"]
