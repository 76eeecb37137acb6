"""deploy/k8s: every manifest parses, has a known kind/apiVersion, and carries what the fleet
needs (probes, grace period past the drain, replicas within the partitions, PDB, monitoring,
limits, non-root), and exposes only what it must (NetworkPolicies, one Secret per role kept out of
the default kustomization, Redis over TLS). A schema check of our own: kubeconform needs schemas
from the internet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from producer.config import ClientConfig
from producer.gateway.config import GatewayConfig
from schemas.model_routing import DEFAULT_MODEL, group_id_for, requests_topic_for
from tests.deploy.deployfiles import K8S, K8S_SECRETS, load_yaml, load_yaml_documents
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
    "NetworkPolicy": "networking.k8s.io/v1",
}
GATEWAY_PORT = 8080
MODEL_LABEL = "embedfleet.io/model"
# The models the fleet runs, each a worker Deployment of its own (their bundles are in the image).
MODELS = (DEFAULT_MODEL, "all-mpnet-base-v2")
# One Secret per role, each with principals of its own (deploy/k8s/secrets/, not in the default
# kustomization), and the Redis server's CA, which every pod that talks to Redis mounts.
WORKER_SECRET = "embedfleet-worker-credentials"
GATEWAY_SECRET = "embedfleet-gateway-credentials"
KEDA_SECRET = "embedfleet-keda-credentials"
REDIS_CA_SECRET = "embedfleet-redis-ca"
# Kafka SCRAM users and Redis ACL users per role (the local stack's have the same names).
PRINCIPALS = {
    WORKER_SECRET: ("embedfleet-worker", "embedfleet-worker"),
    GATEWAY_SECRET: ("embedfleet-gateway", "embedfleet-reader"),
}
KEDA_USER = "embedfleet-keda"
# What the NetworkPolicies let in (per component: the pod's port) and out (workers and gateway).
INGRESS_PORTS = {("worker", METRICS_PORT, "TCP"), ("gateway", GATEWAY_PORT, "TCP")}
KAFKA_PORTS = {9092, 9093, 9094}
REDIS_PORTS = {6379, 6380}
DNS_PORTS = {(53, "UDP"), (53, "TCP")}
Manifest = dict[str, Any]


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(K8S / "kustomization.yaml")
    return loaded


def manifests() -> list[Manifest]:
    return [doc for resource in kustomization()["resources"] for doc in load_yaml_documents(K8S / resource)]


def secrets_kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(K8S_SECRETS / "kustomization.yaml")
    return loaded


def secrets() -> dict[str, Manifest]:
    """The Secret templates (deploy/k8s/secrets/), by name."""
    docs = [
        doc
        for resource in secrets_kustomization()["resources"]
        for doc in load_yaml_documents(K8S_SECRETS / resource)
    ]
    by_name = {doc["metadata"]["name"]: doc for doc in docs}
    assert len(by_name) == len(docs), "two Secret templates with one name"
    return by_name


def secret_data(name: str) -> dict[str, str]:
    data: dict[str, str] = secrets()[name]["stringData"]
    return data


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
    env: dict[str, str] = {**one("ConfigMap")["data"], **secret_data(WORKER_SECRET)}
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


@pytest.mark.parametrize(
    "path",
    sorted(K8S.glob("*.yaml")) + sorted(K8S_SECRETS.glob("*.yaml")),
    ids=lambda p: str(Path(p).relative_to(K8S)),
)
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
    # Every kind but the Secret in the default kustomization; the Secrets (templates) apart.
    kinds = {m["kind"] for m in manifests()}
    assert set(API_VERSIONS) - {"Secret"} <= kinds, f"missing: {set(API_VERSIONS) - {'Secret'} - kinds}"
    assert {s["kind"] for s in secrets().values()} == {"Secret"}


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
    assert sources["secretRef"]["secretRef"]["name"] == WORKER_SECRET
    assert "optional" not in sources["secretRef"]["secretRef"]


def test_configmap_and_secret_are_a_valid_worker_configuration() -> None:
    config_data: dict[str, str] = one("ConfigMap")["data"]
    worker_secret = secret_data(WORKER_SECRET)
    known = {f.metadata["env"] for f in WorkerConfig.__dataclass_fields__.values()}
    assert not set(config_data) - known, f"unknown settings: {set(config_data) - known}"
    assert not set(worker_secret) - known, f"unknown settings: {set(worker_secret) - known}"
    secret_settings = {
        f.metadata["env"] for f in WorkerConfig.__dataclass_fields__.values() if f.metadata["secret"]
    }
    assert not secret_settings & set(config_data), "credentials belong in the Secret, not the ConfigMap"
    assert secret_settings <= set(worker_secret)
    assert all("CHANGE-ME" in worker_secret[key] for key in secret_settings), "the Secret is a template"
    config = WorkerConfig.from_env({**config_data, **worker_secret})
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
    secret_keys = set(secret_data(KEDA_SECRET))
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == KEDA_SECRET and ref["key"] in secret_keys


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
    # It reads the fleet's Kafka/Redis settings, its own, and its own role's Secret (credentials
    # and API keys, not optional: it never starts without keys); every value is a valid setting.
    refs = [next(iter(v.values()))["name"] for v in c["envFrom"]]
    assert refs == ["embedfleet-config", "embedfleet-gateway-config", GATEWAY_SECRET]
    assert all("optional" not in next(iter(v.values())) for v in c["envFrom"])
    gateway_env = {**one("ConfigMap", "gateway")["data"], **secret_data(GATEWAY_SECRET)}
    gateway_config = GatewayConfig.from_env(gateway_env)
    assert gateway_config.host == "0.0.0.0" and gateway_config.port == GATEWAY_PORT
    assert gateway_config.keys and all("CHANGE-ME" in key for key in gateway_config.keys)
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


# --- exposing only what they must (issue 25) -----------------------------------------------------


def deployments() -> list[Manifest]:
    return [m for m in manifests() if m["kind"] == "Deployment"]


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def network_policies() -> list[Manifest]:
    return [m for m in manifests() if m["kind"] == "NetworkPolicy"]


def allow_policies() -> list[Manifest]:
    return [p for p in network_policies() if p["spec"].get("ingress") or p["spec"].get("egress")]


def env_secret_refs(deployment: Manifest) -> set[str]:
    """The Secrets a Deployment's containers read into their environment (envFrom, secretKeyRef)."""
    refs: set[str] = set()
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        refs |= {source["secretRef"]["name"] for source in c.get("envFrom", []) if "secretRef" in source}
        for item in c.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add(ref["name"])
    return refs


def volume_secret_refs(deployment: Manifest) -> set[str]:
    volumes = deployment["spec"]["template"]["spec"].get("volumes", [])
    return {v["secret"]["secretName"] for v in volumes if "secret" in v}


def own_secret(deployment: Manifest) -> str:
    return GATEWAY_SECRET if is_gateway(deployment) else WORKER_SECRET


def test_the_default_kustomization_lists_no_secret() -> None:
    assert not [m["metadata"]["name"] for m in manifests() if m["kind"] == "Secret"]
    assert not (K8S / "secret.yaml").exists(), "the Secret templates live in deploy/k8s/secrets/"
    assert not [r for r in kustomization()["resources"] if "secret" in r.lower()]


def test_the_secret_templates_are_a_kustomization_of_their_own() -> None:
    k = secrets_kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert k["namespace"] == kustomization()["namespace"]
    listed = set(k["resources"])
    on_disk = {p.name for p in K8S_SECRETS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"not listed: {on_disk - listed}; missing: {listed - on_disk}"
    assert set(secrets()) == {WORKER_SECRET, GATEWAY_SECRET, KEDA_SECRET, REDIS_CA_SECRET}
    for name, secret in secrets().items():
        assert secret["kind"] == "Secret" and secret["type"] == "Opaque", name
        assert "data" not in secret, f"{name}: a template has readable placeholders (stringData)"
        # Every value that is not a user name is a placeholder: no real credential committed.
        for key, value in secret["stringData"].items():
            if not key.endswith("USERNAME") and key != "username":
                assert "CHANGE-ME" in value, (name, key)


def test_each_role_has_principals_of_its_own() -> None:
    for name, (kafka_user, redis_user) in PRINCIPALS.items():
        data = secret_data(name)
        assert data["EMBEDFLEET_KAFKA_SASL_USERNAME"] == kafka_user, name
        assert data["EMBEDFLEET_REDIS_USERNAME"] == redis_user, name
        assert {"EMBEDFLEET_KAFKA_SASL_PASSWORD", "EMBEDFLEET_REDIS_PASSWORD"} <= data.keys(), name
    keda = secret_data(KEDA_SECRET)
    assert set(keda) == {"username", "password"} and keda["username"] == KEDA_USER
    kafka_users = [secret_data(n)["EMBEDFLEET_KAFKA_SASL_USERNAME"] for n in PRINCIPALS] + [KEDA_USER]
    assert len(set(kafka_users)) == 3, "worker, gateway and KEDA each log in to Kafka as themselves"
    passwords = [secret_data(n)[k] for n in PRINCIPALS for k in secret_data(n) if k.endswith("PASSWORD")]
    passwords.append(secret_data(KEDA_SECRET)["password"])
    assert len(set(passwords)) == len(passwords), "no password shared between roles or systems"
    # The API keys are the gateway's alone; no role but the workers has the read/write Redis user.
    assert "EMBEDFLEET_GATEWAY_API_KEYS" in secret_data(GATEWAY_SECRET)
    assert "EMBEDFLEET_GATEWAY_API_KEYS" not in secret_data(WORKER_SECRET)


@pytest.mark.parametrize("name", ["embedfleet", "embedfleet-all-mpnet-base-v2", "embedfleet-gateway"])
def test_every_deployment_reads_only_its_own_roles_secret(name: str) -> None:
    (deployment,) = [d for d in deployments() if d["metadata"]["name"] == name]
    assert env_secret_refs(deployment) == {own_secret(deployment)}
    # Mounted Secrets: the Redis CA only (credentials come through the environment).
    assert volume_secret_refs(deployment) == {REDIS_CA_SECRET}
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                assert "optional" not in source["secretRef"], "a missing Secret must stop the pod"
    if is_gateway(deployment):
        assert WORKER_SECRET not in env_secret_refs(deployment), "the gateway never gets the workers' login"
    else:
        assert GATEWAY_SECRET not in env_secret_refs(deployment), "workers never get the API keys"
    assert KEDA_SECRET not in env_secret_refs(deployment)
    assert {d["metadata"]["name"] for d in deployments()} == {
        "embedfleet",
        "embedfleet-all-mpnet-base-v2",
        "embedfleet-gateway",
    }


def test_keda_authenticates_with_its_own_secret() -> None:
    (auth,) = [m for m in manifests() if m["kind"] == "TriggerAuthentication"]
    refs = auth["spec"]["secretTargetRef"]
    assert {ref["parameter"] for ref in refs} == {"username", "password"}
    for ref in refs:
        assert ref["name"] == KEDA_SECRET and ref["key"] in secret_data(KEDA_SECRET), ref
    for scaled in (m for m in manifests() if m["kind"] == "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
            assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"


def test_redis_is_reached_over_tls_with_the_mounted_ca() -> None:
    config_maps = [m for m in manifests() if m["kind"] == "ConfigMap"]
    urls = [m["data"]["EMBEDFLEET_REDIS_URL"] for m in config_maps if "EMBEDFLEET_REDIS_URL" in m["data"]]
    for deployment in deployments():
        env = container(deployment).get("env", [])
        urls += [str(item["value"]) for item in env if item["name"].endswith("REDIS_URL")]
    assert urls and all(url.startswith("rediss://") for url in urls), urls
    data = one("ConfigMap")["data"]
    cafile = Path(data["EMBEDFLEET_REDIS_SSL_CAFILE"])
    assert "ca.crt" in secret_data(REDIS_CA_SECRET) and cafile.name == "ca.crt"
    config = WorkerConfig.from_env(worker_environment(default_worker()))
    assert config.redis_url.startswith("rediss://") and config.redis_ssl_cafile == str(cafile)
    for deployment in deployments():  # every pod that reads the ConfigMap finds the CA file there
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = [
            m
            for m in container(deployment)["volumeMounts"]
            if volumes[m["name"]].get("secret", {}).get("secretName") == REDIS_CA_SECRET
        ]
        assert len(mounts) == 1 and mounts[0]["readOnly"] is True, deployment["metadata"]["name"]
        assert Path(mounts[0]["mountPath"]) == cafile.parent, deployment["metadata"]["name"]


def test_the_gateway_and_the_workers_log_in_as_their_own_users() -> None:
    gateway = one("Deployment", "gateway")
    env = {
        **one("ConfigMap")["data"],
        **one("ConfigMap", "gateway")["data"],
        **secret_data(own_secret(gateway)),
    }
    client = ClientConfig.from_env(env)
    assert (client.kafka_sasl_username, client.redis_username) == PRINCIPALS[GATEWAY_SECRET]
    assert client.redis_url.startswith("rediss://") and client.redis_ssl_cafile
    assert client.kafka_security_protocol == "SASL_SSL"
    for deployment in worker_deployments().values():
        config = WorkerConfig.from_env(worker_environment(deployment))
        assert (config.kafka_sasl_username, config.redis_username) == PRINCIPALS[WORKER_SECRET]


def test_a_default_deny_network_policy_covers_the_namespace() -> None:
    denies = [
        p
        for p in network_policies()
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(denies) == 1
    # Every other policy allows something, for the fleet's own pods only.
    allowing = {p["metadata"]["name"] for p in allow_policies()}
    for policy in network_policies():
        if policy["metadata"]["name"] != denies[0]["metadata"]["name"]:
            assert policy["metadata"]["name"] in allowing, policy["metadata"]["name"]
            assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "embedfleet"
            assert set(policy["spec"]["policyTypes"]) == (
                ({"Ingress"} if "ingress" in policy["spec"] else set())
                | ({"Egress"} if "egress" in policy["spec"] else set())
            ), policy["metadata"]["name"]


def ports_of(rule: dict[str, Any]) -> set[tuple[int, str]]:
    assert rule.get("ports"), f"a rule without ports allows every port: {rule}"
    return {(int(p["port"]), p.get("protocol", "TCP")) for p in rule["ports"]}


def test_ingress_is_allowed_exactly_on_the_pods_ports() -> None:
    allowed: set[tuple[str, int, str]] = set()
    open_to_anyone: set[str] = set()
    scraped: set[str] = set()
    for policy in allow_policies():
        for deployment in deployments():
            if not selects(policy["spec"]["podSelector"], pod_labels(deployment)):
                continue
            component = pod_labels(deployment)["app.kubernetes.io/component"]
            for rule in policy["spec"].get("ingress", []):
                allowed |= {(component, port, protocol) for port, protocol in ports_of(rule)}
                if not rule.get("from"):
                    open_to_anyone.add(component)
                for peer in rule.get("from", []):
                    namespace = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    if namespace.get("kubernetes.io/metadata.name") == "monitoring":
                        assert peer["podSelector"]["matchLabels"], "Prometheus by label, not the namespace"
                        scraped.add(component)
    assert allowed == INGRESS_PORTS
    assert open_to_anyone == {"gateway"}, "only the gateway's HTTP port is open to callers"
    assert scraped == {"worker", "gateway"}, "Prometheus scrapes both"
    # The ports allowed are the ones the pods listen on (metrics, http), which the probes use.
    for deployment in deployments():
        component = pod_labels(deployment)["app.kubernetes.io/component"]
        listening = {(p["containerPort"], p["protocol"]) for p in container(deployment)["ports"]}
        assert {(port, proto) for c, port, proto in INGRESS_PORTS if c == component} == listening


def test_egress_is_allowed_exactly_to_kafka_redis_and_dns() -> None:
    egress_rules = [rule for policy in allow_policies() for rule in policy["spec"].get("egress", [])]
    allowed = set().union(*(ports_of(rule) for rule in egress_rules))
    tcp = {(port, "TCP") for port in KAFKA_PORTS | REDIS_PORTS}
    assert allowed == tcp | DNS_PORTS
    for rule in egress_rules:
        assert rule.get("to"), f"an egress rule without `to` reaches anywhere: {rule}"
        ports = {port for port, _ in ports_of(rule)}
        assert ports in (KAFKA_PORTS, REDIS_PORTS, {53}), f"one destination per rule: {rule}"
        if ports == {53}:
            (peer,) = rule["to"]
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
            assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    # Both the workers and the gateway get it; nothing else in the namespace does.
    for deployment in deployments():
        selecting = [
            p
            for p in allow_policies()
            if p["spec"].get("egress") and selects(p["spec"]["podSelector"], pod_labels(deployment))
        ]
        assert len(selecting) == 1, deployment["metadata"]["name"]
    # The example addresses are within what the policy allows.
    data = one("ConfigMap")["data"]
    assert int(data["EMBEDFLEET_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1]) in KAFKA_PORTS
    redis_port = int(data["EMBEDFLEET_REDIS_URL"].split("://", 1)[1].split("/")[0].rsplit(":", 1)[1])
    assert redis_port in REDIS_PORTS
