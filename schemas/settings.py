"""Configuration objects read from the environment and overridden by CLI flags.

A setting is a dataclass field made with ``setting()``: it declares its environment variable and
help text once, and the flags, the README's tables (checked by tests) and ``--print-config`` all
come from it. Secrets (passwords, API keys) have no flag, so they never show up in ``ps`` or
shell history, and ``describe()`` masks them. The worker's ``WorkerConfig`` and the gateway's
``GatewayConfig`` are built this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def setting(
    env: str,
    help: str,
    *,
    default: Any = None,
    secret: bool = False,
    choices: tuple[str, ...] | None = None,
    factory: Any = None,
    parse: Any = None,
) -> Any:
    """``parse``: turns the raw text into the value, for a setting whose type alone does not say
    how (the worker's ``--model`` takes a model name or a bundle path)."""
    metadata = {"env": env, "help": help, "secret": secret, "choices": choices, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def from_env(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """An instance of the settings class ``cls`` from the environment; overrides (not None) win."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = environ.get(f.metadata["env"])
        if raw is not None and raw != "":
            values[f.name] = convert(f, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def add_cli_arguments(cls: type[Any], parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting of ``cls`` (secrets excepted), default None = not given."""
    for f in dataclasses.fields(cls):
        if f.metadata["secret"]:
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            type=_converter(f),
            help=f"{f.metadata['help']} (env {f.metadata['env']})",
        )


def from_args(cls: type[T], args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> T:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return from_env(cls, environ, **overrides)


def describe(config: Any) -> dict[str, str]:
    """Settings as strings for logs and --print-config, secrets and URL passwords masked."""
    shown: dict[str, str] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata["secret"] and value:
            shown[f.name] = "***"
        elif isinstance(value, str) and "://" in value:
            shown[f.name] = mask_url_password(value)
        else:
            shown[f.name] = str(value)
    return shown


def mask_url_password(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host (a password may be put in the URL)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _converter(f: dataclasses.Field[Any]) -> Any:
    def convert_flag(raw: str) -> Any:
        return convert(f, raw)

    convert_flag.__name__ = f.name  # argparse names the setting in its error message
    return convert_flag


def convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    choices = f.metadata["choices"]
    if choices and raw not in choices:
        raise ValueError(f"{f.metadata['env']}={raw!r}: expected one of {', '.join(choices)}")
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse(raw)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw).expanduser()
        if kind == "bool":
            word = raw.strip().lower()
            if word in ("true", "1", "yes", "on"):
                return True
            if word in ("false", "0", "no", "off"):
                return False
            raise ValueError(word)
    except ValueError as exc:
        raise ValueError(f"{f.metadata['env']}={raw!r}: expected a {kind}") from exc
    return raw
