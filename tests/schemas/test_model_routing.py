"""Several models, one fleet: the one naming rule (schemas/model_routing.py) and how the worker's
and the client's configurations apply it (no services needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from producer import ClientConfig
from schemas.model_routing import DEFAULT_MODEL, group_id_for, requests_topic_for
from worker.config import WorkerConfig, bundle_model_name, model_or_bundle

MPNET = "all-mpnet-base-v2"


def test_the_default_model_keeps_the_base_names_the_others_get_their_own() -> None:
    assert requests_topic_for(DEFAULT_MODEL) == "embed.requests"
    assert group_id_for(DEFAULT_MODEL) == "embedfleet"
    assert requests_topic_for(MPNET) == "embed.requests.all-mpnet-base-v2"
    assert group_id_for(MPNET) == "embedfleet.all-mpnet-base-v2"
    # Another default model: it takes the base names, and MiniLM gets its own.
    assert requests_topic_for(MPNET, default_model=MPNET) == "embed.requests"
    assert requests_topic_for(DEFAULT_MODEL, default_model=MPNET) == "embed.requests.all-MiniLM-L6-v2"
    assert group_id_for(MPNET, base="team-a") == "team-a.all-mpnet-base-v2"


def test_names_become_legal_kafka_topic_names() -> None:
    assert requests_topic_for("org/model v2") == "embed.requests.org_model_v2"
    with pytest.raises(ValueError):
        requests_topic_for("")


def test_model_takes_a_name_or_a_bundle_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_HOME", str(tmp_path))
    assert model_or_bundle(MPNET) == tmp_path / "models" / MPNET
    assert model_or_bundle("/opt/bundles/x") == Path("/opt/bundles/x")
    assert model_or_bundle("./x") == Path("x")  # a path: a bundle in the current directory
    parser = argparse.ArgumentParser()
    WorkerConfig.add_cli_arguments(parser)
    config = WorkerConfig.from_args(parser.parse_args(["--model", MPNET]), {})
    assert config.model == tmp_path / "models" / MPNET
    assert (config.model_name, config.requests_topic, config.group_id) == (
        MPNET,
        "embed.requests.all-mpnet-base-v2",
        "embedfleet.all-mpnet-base-v2",
    )
    default = WorkerConfig.from_env({})
    assert (default.requests_topic, default.group_id) == ("embed.requests", "embedfleet")


def test_explicit_topic_and_group_win_over_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_HOME", str(tmp_path))
    env = {"EMBEDFLEET_MODEL": MPNET, "EMBEDFLEET_REQUESTS_TOPIC": "jobs", "EMBEDFLEET_GROUP_ID": "g"}
    config = WorkerConfig.from_env(env)
    assert (config.requests_topic, config.group_id) == ("jobs", "g")
    only_group = WorkerConfig.from_env({"EMBEDFLEET_MODEL": MPNET, "EMBEDFLEET_GROUP_ID": "g"})
    assert (only_group.requests_topic, only_group.group_id) == ("embed.requests.all-mpnet-base-v2", "g")
    other_default = WorkerConfig.from_env({"EMBEDFLEET_MODEL": MPNET, "EMBEDFLEET_DEFAULT_MODEL": MPNET})
    assert (other_default.requests_topic, other_default.group_id) == ("embed.requests", "embedfleet")


def test_a_bundle_path_is_named_by_its_manifest(tmp_path: Path) -> None:
    bundle = tmp_path / "some-copy"
    bundle.mkdir()
    assert bundle_model_name(bundle) == "some-copy"  # no manifest (yet): the directory's name
    (bundle / "manifest.json").write_text(json.dumps({"name": MPNET}))
    assert bundle_model_name(bundle) == MPNET
    config = WorkerConfig.from_env({"EMBEDFLEET_MODEL": str(bundle)})
    assert config.requests_topic == "embed.requests.all-mpnet-base-v2"


def test_the_client_routes_each_model_to_its_topic() -> None:
    assert ClientConfig().requests_topic == "embed.requests"
    mpnet = ClientConfig(model_name=MPNET)
    assert mpnet.requests_topic == "embed.requests.all-mpnet-base-v2"
    assert mpnet.requests_topic_of(DEFAULT_MODEL) == "embed.requests"
    explicit = ClientConfig.from_env({"EMBEDFLEET_REQUESTS_TOPIC": "jobs"})
    # An explicit topic is the configured model's; the default model's is the others' base.
    assert explicit.requests_topic_of(DEFAULT_MODEL) == "jobs"
    assert explicit.requests_topic_of(MPNET) == "jobs.all-mpnet-base-v2"
    mpnet_jobs = ClientConfig.from_env({"EMBEDFLEET_REQUESTS_TOPIC": "jobs", "EMBEDFLEET_MODEL_NAME": MPNET})
    assert mpnet_jobs.requests_topic_of(MPNET) == "jobs"
    assert mpnet_jobs.requests_topic_of(DEFAULT_MODEL) == "embed.requests"


def test_the_shared_examples_that_the_go_client_checks_too() -> None:
    path = Path(__file__).resolve().parents[2] / "schemas" / "testdata" / "model_routing.json"
    cases = json.loads(path.read_text())["cases"]
    assert len(cases) >= 5
    for case in cases:
        default = case["default_model"]
        assert (
            requests_topic_for(case["model"], default_model=default, base=case["topic_base"])
            == (case["requests_topic"])
        )
        assert group_id_for(case["model"], default_model=default, base=case["group_base"]) == case["group_id"]
