"""What the gateway's service reports when it cannot answer: domain errors, no HTTP in them.

The service says what went wrong (no fleet, too much outstanding, a text refused, the deadline);
``app.api_error`` alone decides what that is in HTTP (status, OpenAI's error object, Retry-After),
as TEI's router maps its core's errors. The message of each is the one the caller reads.
"""

from __future__ import annotations

from producer.errors import EmbeddingError

# The request's fault. Anything else a worker answers (inference_failed, internal_error...) is
# the server's.
CLIENT_ERROR_CODES = frozenset(
    {
        "empty_text",
        "text_too_long",
        "invalid_encoding",
        "invalid_request",
        "unknown_task",
        "unsupported_dimensions",
        "message_too_large",
    }
)


class GatewayError(EmbeddingError):
    """The gateway service's errors: ``str(error)`` is the message for the caller."""


class NoFleet(GatewayError):
    """No fleet to send to (not connected to Kafka, no model contract yet): try again soon."""


class Overloaded(GatewayError):
    """Too many texts already wait for the fleet: try again soon."""


class UnknownModel(GatewayError):
    """The request names a model this gateway does not serve."""


class UnsupportedDimensions(GatewayError):
    """The request asks for a width the model does not offer."""


class FleetFailed(GatewayError):
    """The gateway's own call to the fleet failed (not a text's fault)."""


class DeadlineExceeded(GatewayError):
    """Some texts got no vector by the request's deadline."""


class RejectedText(GatewayError):
    """A text got an error instead of a vector, so the whole request fails. ``code`` is the
    error code; ``by_request`` says whether the text was at fault (or the fleet was)."""

    def __init__(self, index: int, code: str, detail: str, count: int) -> None:
        self.index = index
        self.code = code
        self.by_request = code in CLIENT_ERROR_CODES
        where = "'input'" if count == 1 else f"'input[{index}]'"
        if self.by_request:
            super().__init__(f"{where}: {detail}")
        else:
            super().__init__(f"{where}: the fleet failed on this text: {code}: {detail}")
