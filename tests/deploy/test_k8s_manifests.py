"""deploy/k8s: every manifest parses, has a known kind/apiVersion, and carries what the fleet
needs (probes, grace period past the drain, replicas within the partitions, PDB, monitoring,
limits, non-root). A schema check of our own: kubeconform needs schemas from the internet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from producer.gateway.config import GatewayConfig
from schemas.model_routing import DEFAULT_MODEL, group_id_for, requests_topic_for
from tests.deploy.deployfiles import K8S, load_yaml, load_yaml_documents
from worker.config import WorkerConfig

DRAIN_S = 120  # the worker drains for up to this long after SIGTERM
PARTITIONS = 6  # embed.requests
METRICS_PORT = 9400
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
}
GATEWAY_PORT = 8080
MODEL_LABEL = "embedfleet.io/model"
# The models the fleet runs, each a worker Deployment of its own (their bundles are in the image).
MODELS = (DEFAULT_MODEL, "all-mpnet-base-v2")
Manifest = dict[str, Any]


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(K8S / "kustomization.yaml")
    return loaded


def manifests() -> list[Manifest]:
    return [doc for resource in kustomization()["resources"] for doc in load_yaml_documents(K8S / resource)]


def is_gateway(manifest: Manifest) -> bool:
    return bool(manifest["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "gateway")


def one(kind: str, component: str = "worker") -> Manifest:
    """The one manifest of ``kind`` for the workers (or for the gateway: labelled component=gateway)."""
    gateway = component == "gateway"
    found = [m for m in manifests() if m["kind"] == kind and is_gateway(m) == gateway]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def worker_deployments() -> dict[str, Manifest]:
    """The workers' Deployments, one per model, by the model they serve (their model label)."""
    found = [m for m in manifests() if m["kind"] == "Deployment" and not is_gateway(m)]
    by_model = {m["spec"]["template"]["metadata"]["labels"][MODEL_LABEL]: m for m in found}
    assert len(by_model) == len(found), "two worker Deployments for one model"
    return by_model


def default_worker() -> Manifest:
    """The default model's Deployment (`embedfleet`: the Service, rules and dashboard name)."""
    deployment = worker_deployments()[DEFAULT_MODEL]
    assert deployment["metadata"]["name"] == "embedfleet"
    return deployment


def scaled_object_of(deployment: Manifest) -> Manifest:
    name = deployment["metadata"]["name"]
    scaled = [m for m in manifests() if m["kind"] == "ScaledObject"]
    found = [m for m in scaled if m["spec"]["scaleTargetRef"]["name"] == name]
    assert len(found) == 1, f"expected one ScaledObject for Deployment {name}, found {len(found)}"
    return found[0]


def worker_environment(deployment: Manifest) -> dict[str, str]:
    """What the worker container's environment resolves to: the ConfigMap and Secret (envFrom),
    then its own `env` values, which win."""
    env: dict[str, str] = {**one("ConfigMap")["data"], **one("Secret")["stringData"]}
    for item in container(deployment).get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def container(deployment: Manifest) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def test_kustomization_lists_every_manifest_and_they_exist() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert k["namespace"] == "embedfleet"
    listed = set(k["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"not listed: {on_disk - listed}; missing: {listed - on_disk}"
    assert any(image["name"] == "embedfleet" for image in k["images"])


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: Path(p).name)
def test_every_document_has_kind_api_version_and_name(path: Path) -> None:
    for doc in load_yaml_documents(path):
        if path.name == "kustomization.yaml":
            continue
        kind = doc.get("kind")
        assert kind in API_VERSIONS, f"{path.name}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == API_VERSIONS[kind], f"{path.name}: {kind} apiVersion"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {kind} without metadata.name"
        # Namespaced objects get the namespace from kustomization.yaml, never a conflicting one.
        assert doc["metadata"].get("namespace") in (None, "embedfleet")


def test_all_kinds_are_present() -> None:
    kinds = {m["kind"] for m in manifests()}
    assert set(API_VERSIONS) <= kinds, f"missing: {set(API_VERSIONS) - kinds}"


@pytest.mark.parametrize("model", MODELS)
def test_deployment_probes_grace_and_strategy(model: str) -> None:
    deployment = worker_deployments()[model]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"metrics": METRICS_PORT}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("metrics", METRICS_PORT)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= 150 and grace > DRAIN_S, "SIGKILL must not cut the drain short"
    # KEDA owns the replica count; a fixed one must at least fit the partitions.
    assert deployment["spec"].get("replicas", 1) <= PARTITIONS
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("model", MODELS)
def test_deployment_resources_and_security(model: str) -> None:
    deployment = worker_deployments()[model]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    resources = c["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[part].keys(), f"resources.{part} needs cpu and memory"
    if model == DEFAULT_MODEL:
        assert resources["limits"]["memory"] == "1536Mi"
    else:  # a wider model needs at least as much (MPNet's 2 GiB is an estimate: see its manifest)
        assert resources["limits"]["memory"] in ("1536Mi", "2Gi", "3Gi", "4Gi")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs a writable /tmp (EMBEDFLEET_HOME=/tmp/embedfleet in the image).
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    preferred = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("model", MODELS)
def test_deployment_environment_comes_from_the_configmap_and_secret(model: str) -> None:
    c = container(worker_deployments()[model])
    sources = {next(iter(k for k in s if k.endswith("Ref"))): s for s in c["envFrom"]}
    assert sources["configMapRef"]["configMapRef"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert sources["secretRef"]["secretRef"]["name"] == one("Secret")["metadata"]["name"]


def test_configmap_and_secret_are_a_valid_worker_configuration() -> None:
    config_data: dict[str, str] = one("ConfigMap")["data"]
    secret_data: dict[str, str] = one("Secret")["stringData"]
    known = {f.metadata["env"] for f in WorkerConfig.__dataclass_fields__.values()}
    assert not set(config_data) - known, f"unknown settings: {set(config_data) - known}"
    assert not set(secret_data) - known, f"unknown settings: {set(secret_data) - known}"
    secrets = {f.metadata["env"] for f in WorkerConfig.__dataclass_fields__.values() if f.metadata["secret"]}
    assert not secrets & set(config_data), "credentials belong in the Secret, not the ConfigMap"
    assert secrets <= set(secret_data)
    assert all("CHANGE-ME" in secret_data[key] for key in secrets), "the Secret is a template"
    config = WorkerConfig.from_env({**config_data, **secret_data})
    assert config.metrics_host == "0.0.0.0" and config.metrics_port == METRICS_PORT
    assert config.intra_op_threads >= 1, "0 means one thread per node core: CPU throttling"


def test_service_and_servicemonitor_agree() -> None:
    service, monitor = one("Service"), one("ServiceMonitor")
    for deployment in worker_deployments().values():  # one job for every model's workers
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names, "ServiceMonitor endpoint port must name a Service port"
        assert endpoint.get("path", "/metrics") == "/metrics"
    # The Operator names the job after the Service; the rules select job="embedfleet".
    assert service["metadata"]["name"] == "embedfleet"


def test_pdb() -> None:
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    for deployment in worker_deployments().values():
        assert (
            pdb["spec"]["selector"]["matchLabels"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )


def test_keda_scales_on_the_group_lag_within_the_partitions() -> None:
    deployment = default_worker()
    scaled = scaled_object_of(deployment)
    config = one("ConfigMap")["data"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] == 1
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= PARTITIONS
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == config["EMBEDFLEET_GROUP_ID"] == "embedfleet"
    assert meta["topic"] == config["EMBEDFLEET_REQUESTS_TOPIC"] == "embed.requests"
    assert meta["bootstrapServers"] == config["EMBEDFLEET_KAFKA_BOOTSTRAP"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    auth = one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret_keys = set(one("Secret")["stringData"])
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == one("Secret")["metadata"]["name"] and ref["key"] in secret_keys


def test_one_worker_deployment_and_scaled_object_per_model_on_its_own_topic_and_group() -> None:
    deployments = worker_deployments()
    assert sorted(deployments) == sorted(MODELS)
    default_spec = default_worker()["spec"]
    topics, groups = set(), set()
    for model, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items() and selector[MODEL_LABEL] == model
        assert deployment["metadata"]["labels"][MODEL_LABEL] == model
        c = container(deployment)
        assert c["image"] == container(default_worker())["image"] and c["args"] == ["worker"]
        # The same pod as the default model's, apart from the model, its resources and its env.
        pod, default_pod = deployment["spec"]["template"]["spec"], default_spec["template"]["spec"]
        for key in ("terminationGracePeriodSeconds", "securityContext", "volumes"):
            assert pod[key] == default_pod[key], (model, key)
        for key in ("startupProbe", "livenessProbe", "readinessProbe", "securityContext", "envFrom", "ports"):
            assert c[key] == container(default_worker())[key], (model, key)
        # What the worker resolves: this model's bundle, its topic and group by the naming rule.
        config = WorkerConfig.from_env(worker_environment(deployment))
        assert str(config.model) == f"/opt/embedfleet/models/{model}"
        assert config.model_name == model
        assert config.requests_topic == requests_topic_for(model)
        assert config.group_id == group_id_for(model)
        # KEDA watches exactly that group on exactly that topic.
        scaled = scaled_object_of(deployment)
        assert scaled["metadata"]["labels"][MODEL_LABEL] == model
        spec = scaled["spec"]
        assert 1 == spec["minReplicaCount"] <= spec["maxReplicaCount"] <= PARTITIONS
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert (meta["consumerGroup"], meta["topic"]) == (config.group_id, config.requests_topic), model
        assert meta["bootstrapServers"] == config.kafka_bootstrap
        assert int(meta["lagThreshold"]) > 0 and meta["allowIdleConsumers"] == "false"
        assert trigger["authenticationRef"]["name"] == one("TriggerAuthentication")["metadata"]["name"]
        topics.add(config.requests_topic)
        groups.add(config.group_id)
    assert len(topics) == len(groups) == len(deployments), "each model on its own topic and group"
    scaled_objects = [m for m in manifests() if m["kind"] == "ScaledObject"]
    assert len(scaled_objects) == len(deployments), "a ScaledObject for every worker Deployment, no more"


def test_the_gateway_deployment_service_hpa_and_monitoring() -> None:
    deployment, service = one("Deployment", "gateway"), one("Service", "gateway")
    c = container(deployment)
    assert c["args"] == ["gateway"] and c["image"] == container(default_worker())["image"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/component"] == "gateway"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not (
        service["spec"]["selector"].items()
        <= default_worker()["spec"]["template"]["metadata"]["labels"].items()
    )
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": GATEWAY_PORT}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # It reads the fleet's Kafka/Redis settings and its own; every value is a valid setting.
    refs = [next(iter(v.values()))["name"] for v in c["envFrom"]]
    assert refs[:3] == ["embedfleet-config", "embedfleet-gateway-config", "embedfleet-credentials"]
    keys = next(
        v["secretRef"]
        for v in c["envFrom"]
        if v.get("secretRef", {}).get("name") == "embedfleet-gateway-keys"
    )
    assert keys["optional"] is True
    gateway_config = GatewayConfig.from_env(one("ConfigMap", "gateway")["data"])
    assert gateway_config.host == "0.0.0.0" and gateway_config.port == GATEWAY_PORT
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > gateway_config.deadline_s, "in-flight requests finish before SIGKILL"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"cpu", "memory"} <= c["resources"]["limits"].keys()
    assert "replicas" not in deployment["spec"], "the HPA owns the count"
    hpa = one("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    monitor = one("ServiceMonitor", "gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    pdb = one("PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
