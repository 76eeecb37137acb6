"""The engine's exception root (kept apart from the embedder so that importing it does not load
ONNX Runtime)."""

from __future__ import annotations

from worker.errors import WorkerError


class EngineError(WorkerError, RuntimeError):
    """The engine cannot be set up or run as asked (bundle, export, variant, device, task)."""
