"""The one configuration object: environment, CLI overrides, validation, documentation."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from worker.config import WorkerConfig
from worker.engine.tokenize import CPU_CALL_TOKENS, LARGE_CALL_TOKENS, call_token_budget

README = Path(__file__).resolve().parents[2] / "README.md"


def test_environment_then_flags() -> None:
    env = {"EMBEDFLEET_BATCH_WINDOW_MS": "12.5", "EMBEDFLEET_GROUP_ID": "g1", "EMBEDFLEET_MODEL": "/m"}
    parser = argparse.ArgumentParser()
    WorkerConfig.add_cli_arguments(parser)
    config = WorkerConfig.from_args(parser.parse_args(["--group-id", "g2"]), env)
    assert config.batch_window_ms == 12.5
    assert config.group_id == "g2"  # the flag wins over the environment
    assert config.model == Path("/m")


def test_bad_values_say_which_setting() -> None:
    with pytest.raises(ValueError, match="EMBEDFLEET_TOKEN_BUDGET"):
        WorkerConfig.from_env({"EMBEDFLEET_TOKEN_BUDGET": "lots"})
    with pytest.raises(ValueError, match="EMBEDFLEET_GUARANTEE"):
        WorkerConfig.from_env({"EMBEDFLEET_GUARANTEE": "at-most-once"})
    with pytest.raises(ValueError):
        WorkerConfig.from_env({"EMBEDFLEET_TOKEN_BUDGET": "0"})


def test_secrets_come_from_the_environment_only() -> None:
    parser = argparse.ArgumentParser()
    WorkerConfig.add_cli_arguments(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert "--kafka-sasl-password" not in flags and "--redis-password" not in flags
    config = WorkerConfig.from_env({"EMBEDFLEET_KAFKA_SASL_PASSWORD": "s3cret"})
    assert config.kafka_sasl_password == "s3cret"
    assert "s3cret" not in str(config.describe())


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    for field in dataclasses.fields(WorkerConfig):
        assert f"`{field.metadata['env']}`" in readme, field.metadata["env"]


def test_a_password_in_the_redis_url_is_masked() -> None:
    config = WorkerConfig.from_env({"EMBEDFLEET_REDIS_URL": "redis://app:hunter2@cache:6379/0"})
    assert config.describe()["redis_url"] == "redis://app:***@cache:6379/0"
    assert "hunter2" not in str(config.describe())


def test_every_metric_carries_the_served_model() -> None:
    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics(model="all-mpnet-base-v2")
    metrics.computed_texts.inc(3)
    metrics.model.info({"name": "all-mpnet-base-v2", "dim": "768"})
    text = metrics.exposition().decode()
    assert 'embedfleet_computed_texts_total{model="all-mpnet-base-v2"} 3.0' in text
    assert 'embedfleet_model_info{dim="768",model="all-mpnet-base-v2",name="all-mpnet-base-v2"}' in text
    metrics.lag.labels("t", "0").set(5)
    lag = 'embedfleet_consumer_lag{model="all-mpnet-base-v2",partition="0",topic="t"} 5.0'
    assert lag in metrics.exposition().decode()  # with the metric's own labels (sorted by name)
    assert "model=" not in WorkerMetrics().exposition().decode()  # no model given: no label


@pytest.mark.parametrize(
    ("setting", "variant", "device", "tokens"),
    [
        (0, "int8", "cpu", CPU_CALL_TOKENS),
        (0, "fp32", "cpu", CPU_CALL_TOKENS),
        (0, "openvino", "cpu", LARGE_CALL_TOKENS),
        (0, "fp16", "cuda", LARGE_CALL_TOKENS),
        (1024, "int8", "cpu", 1024),
        (4096, "fp16", "cuda", 4096),
    ],
)
def test_model_calls_are_sized_per_backend_unless_set(
    setting: int, variant: str, device: str, tokens: int
) -> None:
    config = WorkerConfig.from_env(
        {
            "EMBEDFLEET_INFERENCE_TOKEN_BUDGET": str(setting),
            "EMBEDFLEET_VARIANT": variant,
            "EMBEDFLEET_DEVICE": device,
        }
    )
    assert config.model_call_tokens() == call_token_budget(setting, variant, device) == tokens


def test_a_negative_model_call_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="EMBEDFLEET_INFERENCE_TOKEN_BUDGET"):
        WorkerConfig.from_env({"EMBEDFLEET_INFERENCE_TOKEN_BUDGET": "-1"})
