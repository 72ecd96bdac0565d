"""The Kubernetes overlays as rendered by `kubectl kustomize` (offline): what issue 11
asks of them, and that they agree with the server's own settings. The schemas and the
security scan are scripts/validate_manifests.py (make kube-validate, in CI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = {
    "base": KUBE / "base",
    "kserve": KUBE / "overlays/kserve",
    "local": KUBE / "overlays/local",
}
RECOMMENDED = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def render(overlay: Path) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    specs = [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    ]
    specs += [
        (f"ServingRuntime/{d['metadata']['name']}", d["spec"])
        for d in docs
        if d["kind"] == "ServingRuntime"
    ]
    return specs


def settings() -> dict[str, str]:
    lines = (KUBE / "base" / "settings.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_the_web_deployment(rendered):
    docs = rendered["base"]
    web = one(docs, "Deployment", "digitserve")
    assert web["spec"]["replicas"] == 2
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = web["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Readiness and start-up on /ready (200 only once this pod's model is loaded),
    # liveness on the worker's own /health.
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == 8080 and "--http_port=8080" in container["args"]
    # The store read-only, in the pod and in the mount.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model-store")
    volume = next(v for v in pod["volumes"] if v["name"] == "model-store")
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
    assert f"--model_dir={mount['mountPath']}" in container["args"]


def test_termination_grace_covers_the_drain(rendered):
    """preStop sleep + gunicorn's graceful timeout must fit in the grace period, or the
    kubelet's SIGKILL cuts requests in flight."""
    graceful = int(settings()["DIGITSERVE_GRACEFUL_TIMEOUT"])
    web = one(rendered["base"], "Deployment")["spec"]["template"]["spec"]
    isvc = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    runtime = one(rendered["kserve"], "ServingRuntime")["spec"]
    for grace, container in [
        (web["terminationGracePeriodSeconds"], web["containers"][0]),
        (isvc["terminationGracePeriodSeconds"], runtime["containers"][0]),
    ]:
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "/bin/sleep"
        assert int(command[1]) + graceful < grace <= int(command[1]) + graceful + 15


def test_every_pod_is_locked_down_and_bounded(rendered):
    for overlay, docs in rendered.items():
        for where, spec in pod_specs(docs):
            pod_security = spec.get("securityContext", {})
            for container in spec["containers"]:
                sc = container["securityContext"]
                label = f"{overlay} {where} {container['name']}"
                assert sc["allowPrivilegeEscalation"] is False, label
                assert sc["readOnlyRootFilesystem"] is True, label
                assert sc["capabilities"]["drop"] == ["ALL"], label
                assert sc.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, label
                limits, requests = (
                    container["resources"]["limits"],
                    container["resources"]["requests"],
                )
                assert {"cpu", "memory"} <= set(limits) & set(requests), label


def test_the_workers_fit_the_cpu_limit(rendered):
    """gunicorn sizes workers and MXNet threads from the node's cores otherwise."""
    s = settings()
    limit = one(rendered["base"], "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["cpu"]
    assert int(s["DIGITSERVE_WORKERS"]) * int(s["DIGITSERVE_OMP_THREADS"]) <= int(limit)


def test_service_hpa_pdb_and_store(rendered):
    docs = rendered["base"]
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "digitserve" and hpa["minReplicas"] >= 2
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    train = one(docs, "Job", "digitserve-train")["spec"]
    assert train["suspend"] is True  # applying the base does not start a training run
    volumes = {v["name"]: v for v in train["template"]["spec"]["volumes"]}
    assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == claim
    mounts = {m["name"]: m for m in train["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert not mounts["model-store"].get("readOnly")  # the trainer publishes
    assert train["template"]["spec"]["restartPolicy"] == "Never"
    seed = one(docs, "Job", "digitserve-seed-store")["spec"]["template"]["spec"]
    assert seed["containers"][0]["command"][:3] == ["python", "-m", "store.seeding"]


def test_one_namespace(rendered):
    """References (ConfigMap, claim, runtime) resolve within a namespace only."""
    for overlay, docs in rendered.items():
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        assert namespaces == {one(docs, "Namespace")["metadata"]["name"]}, overlay


def test_labels_and_prometheus_annotations(rendered):
    for overlay, docs in rendered.items():
        for doc in docs:
            labels = set(doc["metadata"].get("labels", {}))
            assert labels >= RECOMMENDED, f"{overlay} {doc['kind']}/{doc['metadata']['name']}"
    template = one(rendered["base"], "Deployment")["spec"]["template"]["metadata"]
    runtime = one(rendered["kserve"], "ServingRuntime")["spec"]
    for scrape in (template["annotations"], runtime["annotations"]):
        assert scrape["prometheus.io/scrape"] == "true"
        assert (scrape["prometheus.io/port"], scrape["prometheus.io/path"]) == (
            "8080",
            "/metrics",
        )


def test_the_kserve_runtime_and_inference_service(rendered):
    docs = rendered["kserve"]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Deployment", "Service", "HorizontalPodAutoscaler"}  # KServe's own
    runtime = one(docs, "ServingRuntime", "digitserve")["spec"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container" and runtime["protocolVersions"] == ["v2"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["port"] == 8080
    assert {"--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080"} <= set(
        container["args"]
    )
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert container["envFrom"][0]["configMapRef"]["name"] in config_maps  # the hashed name
    assert container["image"] == "digitserve:0.1.0"
    isvc = one(docs, "InferenceService", "digitserve")["spec"]["predictor"]
    model = isvc["model"]
    assert model["runtime"] == "digitserve" and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    claim, _, path = model["storageUri"].removeprefix("pvc://").partition("/")
    assert claim == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert path.count("/") == 1  # <name>/<version>: one exported version
    assert isvc["minReplicas"] >= 2
    assert isvc["deploymentStrategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert pdb == {"serving.kserve.io/inferenceservice": "digitserve"}


def test_the_local_overlay_uses_local_images_only(rendered):
    for where, spec in pod_specs(rendered["local"]):
        for container in spec["containers"]:
            assert container["image"].startswith("localhost/"), where
            assert container["image"].endswith(":kube-e2e"), where
            assert container["imagePullPolicy"] == "Never", where
    train = one(rendered["local"], "Job", "digitserve-train")["spec"]["template"]["spec"]
    args = train["containers"][0]["args"]
    assert any(a.startswith("--limit-train=") for a in args)
    assert any(a.startswith("--epochs=") and int(a.split("=")[1]) <= 10 for a in args)
