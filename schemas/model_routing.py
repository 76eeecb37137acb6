"""Several models, one fleet: the one naming rule that says where each model's jobs go.

Each model is served by its own consumer group on its own requests topic, so it is scaled on its
own lag. The default model keeps the base names (``embed.requests``, group ``embedfleet``), so a
one-model fleet is configured as before; any other model NAME gets ``<base>.<NAME>``:

* requests topic: ``embed.requests`` for the default model, ``embed.requests.<NAME>`` otherwise;
* consumer group: ``embedfleet`` for the default model, ``embedfleet.<NAME>`` otherwise.

``<NAME>`` is the model name with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_``
(``schemas.cache_layout.safe_model_name``; Kafka topic names allow no others). The worker, the
gateway and the Python client all call these functions; an explicitly configured topic or group
wins over the rule.
"""

from __future__ import annotations

from typing import Final

from schemas.cache_layout import safe_model_name

DEFAULT_MODEL: Final = "all-MiniLM-L6-v2"
BASE_REQUESTS_TOPIC: Final = "embed.requests"
BASE_GROUP_ID: Final = "embedfleet"


def _derived(base: str, model: str, default_model: str) -> str:
    if not model:
        raise ValueError("a model name is needed to derive its topic and group")
    return base if model == default_model else f"{base}.{safe_model_name(model)}"


def requests_topic_for(
    model: str, *, default_model: str = DEFAULT_MODEL, base: str = BASE_REQUESTS_TOPIC
) -> str:
    """The topic the jobs of ``model`` arrive on."""
    return _derived(base, model, default_model or DEFAULT_MODEL)


def group_id_for(model: str, *, default_model: str = DEFAULT_MODEL, base: str = BASE_GROUP_ID) -> str:
    """The consumer group of the workers that serve ``model``."""
    return _derived(base, model, default_model or DEFAULT_MODEL)
