"""The worker package's exception root: every error it defines derives from ``WorkerError`` (the
engine's from ``worker.engine.errors.EngineError``, itself a WorkerError), so a caller can catch
the package's own errors in one clause. Each also keeps the built-in base its callers expect."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the errors the worker package raises."""


class ContractMismatch(WorkerError, RuntimeError):
    """Redis holds another serving fingerprint for this model: clients compute content hashes from
    the published contract, so one fleet serves one fingerprint."""
