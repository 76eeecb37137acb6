"""The wire contract's exception root: every error schemas/ raises derives from ``SchemaError``."""

from __future__ import annotations


class SchemaError(Exception):
    """Base of the errors of the wire contract (requests, results, input files)."""
