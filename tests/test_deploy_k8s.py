"""deploy/k8s: the manifests parse and every name they refer to exists (ConfigMaps, Secrets and
their keys, Services and their targets, selectors, the KEDA target and its Redis list)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.worker_image import compile_cache_dirs

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
WORKLOADS = ("Deployment", "StatefulSet")


def _load() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


DOCS = _load()


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in DOCS if d["kind"] == kind}


def _containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def _secret_keys(secret: dict) -> set[str]:
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def test_every_manifest_file_is_listed_and_well_formed() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    for doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]
    keys = [(d["kind"], d["metadata"]["name"]) for d in DOCS]
    assert len(keys) == len(set(keys)), "duplicate objects"


def test_workload_selectors_match_their_pod_labels() -> None:
    for kind in WORKLOADS:
        for name, workload in _by_kind(kind).items():
            selector = workload["spec"]["selector"]["matchLabels"]
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{kind} {name}: selector does not match its pods"


def test_services_select_pods_and_target_named_ports() -> None:
    pods = [w for kind in WORKLOADS for w in _by_kind(kind).values()]
    for name, service in _by_kind("Service").items():
        selector = service["spec"]["selector"]
        matched = [w for w in pods if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, f"Service {name} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in matched:
                ports = [p for c in _containers(workload) for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in ports), (
                    f"Service {name}: no container port {target!r} in {workload['metadata']['name']}"
                )
    for name, statefulset in _by_kind("StatefulSet").items():
        assert statefulset["spec"]["serviceName"] in _by_kind("Service"), name


def test_config_and_secret_references_exist() -> None:
    configmaps, secrets = _by_kind("ConfigMap"), _by_kind("Secret")
    for kind in WORKLOADS:
        for name, workload in _by_kind(kind).items():
            for container in _containers(workload):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in configmaps, name
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in secrets, name
                for var in container.get("env", []):
                    ref = var.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        secret = secrets.get(ref["secretKeyRef"]["name"])
                        assert secret is not None, f"{name}: {var['name']} names a missing Secret"
                        assert ref["secretKeyRef"]["key"] in _secret_keys(secret), f"{name}: {var['name']}"
                    if "configMapKeyRef" in ref:
                        configmap = configmaps.get(ref["configMapKeyRef"]["name"])
                        assert configmap is not None and ref["configMapKeyRef"]["key"] in configmap["data"]
                    if "fieldRef" in ref:
                        assert ref["fieldRef"]["fieldPath"].startswith(("metadata.", "spec.", "status."))


def test_settings_are_variables_the_processes_read() -> None:
    """A typo in a ConfigMap key would be silently ignored by the processes: catch it here."""
    from api.config import ApiConfig
    from worker.config import WorkerConfig

    read = _variables_read(ApiConfig.from_env) | _variables_read(WorkerConfig.from_env)
    env = dict(_by_kind("ConfigMap")["sd3serve-config"]["data"])
    for name in WORKLOADS:
        for workload in _by_kind(name).values():
            for container in _containers(workload):
                env.update({v["name"]: "x" for v in container.get("env", []) if v["name"].startswith("SD3SERVE_")})
    unknown = {k for k in env if k.startswith("SD3SERVE_")} - read
    assert not unknown, f"set but read by no config class: {sorted(unknown)}"
    data = _by_kind("ConfigMap")["sd3serve-config"]["data"]
    ApiConfig.from_env(data)
    WorkerConfig.from_env(data)


def _variables_read(from_env) -> set[str]:
    class Recorder(dict):
        seen: set[str] = set()

        def __contains__(self, key: object) -> bool:
            self.seen.add(str(key))
            return False

        def get(self, key, default=None):  # type: ignore[no-untyped-def]
            self.seen.add(str(key))
            return default

    recorder = Recorder()
    from_env(recorder)
    return recorder.seen


def test_worker_requests_a_gpu_and_outlasts_its_shutdown_grace() -> None:
    worker = _by_kind("Deployment")["sd3serve-worker"]
    spec = worker["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    grace = float(_by_kind("ConfigMap")["sd3serve-config"]["data"]["SD3SERVE_SHUTDOWN_GRACE"])
    assert spec["terminationGracePeriodSeconds"] >= grace + 30, "no time left to store images and requeue"
    metrics_port = int(_by_kind("ConfigMap")["sd3serve-config"]["data"]["SD3SERVE_METRICS_PORT"])
    assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)


def test_keda_scales_the_worker_deployment_on_the_rq_queue() -> None:
    [scaled] = _by_kind("ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in _by_kind("Deployment")
    assert "nvidia.com/gpu" in _containers(_by_kind("Deployment")[target["name"]])[0]["resources"]["limits"]
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]

    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    queue = _by_kind("ConfigMap")["sd3serve-config"]["data"]["SD3SERVE_QUEUE"]
    assert meta["listName"] == f"rq:queue:{queue}"
    assert int(meta["listLength"]) >= 1

    # The address is the Redis Service, and the same server and database as the processes use.
    host, port = meta["address"].rsplit(":", 1)
    service_name, namespace = host.split(".")[:2]
    service = _by_kind("Service")[service_name]
    assert namespace == service["metadata"]["namespace"]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    secret = _by_kind("Secret")["sd3serve-secrets"]["stringData"]
    url = urlparse(secret["redis-url"])
    assert (url.hostname, url.port) == (host, int(port))
    assert url.path.lstrip("/") == meta.get("databaseIndex", "0")

    auth = _by_kind("TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in _secret_keys(_by_kind("Secret")[ref["name"]])
        if ref["parameter"] == "password":
            assert secret[ref["key"]] == url.password, "KEDA and the processes must use the same password"


def test_rq_really_keeps_waiting_jobs_in_the_list_keda_watches(redis_url: str) -> None:
    """The list name is RQ's, not a guess: enqueue with RQ and read the list KEDA reads."""
    import redis
    from rq import Queue

    listname = _by_kind("ScaledObject")["sd3serve-worker"]["spec"]["triggers"][0]["metadata"]["listName"]
    connection = redis.Redis.from_url(redis_url)
    queue_name = f"k8s-test-{__import__('os').getpid()}"
    queue = Queue(queue_name, connection=connection)
    try:
        queue.enqueue("worker.jobs.generate", prompt="x")
        queue.enqueue("worker.jobs.generate", prompt="y")
        assert connection.llen(listname.replace("sd3serve", queue_name, 1)) == 2 == len(queue)
    finally:
        queue.delete(delete_jobs=True)


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_parse(path: Path) -> None:
    assert list(yaml.safe_load_all(path.read_text()))


def test_the_worker_keeps_its_compile_caches_across_container_restarts() -> None:
    cache_dirs = compile_cache_dirs()
    assert len(cache_dirs) == 2, cache_dirs
    spec = _by_kind("Deployment")["sd3serve-worker"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for cache_dir in cache_dirs:
        mount = next(m for m in container["volumeMounts"] if cache_dir.startswith(m["mountPath"] + "/"))
        assert "emptyDir" in volumes[mount["name"]] or "persistentVolumeClaim" in volumes[mount["name"]]
