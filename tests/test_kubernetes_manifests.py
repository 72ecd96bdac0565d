"""The Kubernetes overlays as rendered by `kubectl kustomize` (offline): what issue 11
asks of them, the nginx sidecar of issue 12, and that they agree with the server's own
settings and with deploy/nginx. The schemas and the security scan are
scripts/validate_manifests.py (make kube-validate, in CI)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

KUBE = ROOT / "deploy" / "kubernetes"
NGINX = ROOT / "deploy" / "nginx"
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


def container(spec: dict, name: str) -> dict:
    (found,) = (c for c in spec["containers"] if c["name"] == name)
    return found


def web_pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "digitserve")["spec"]["template"]["spec"]


def nginx_config(docs: list[dict], pod: dict) -> dict[str, str]:
    """The files of the ConfigMap the pod mounts as nginx's configuration."""
    (volume,) = (v for v in pod["volumes"] if v["name"] == "nginx-config")
    return one(docs, "ConfigMap", volume["configMap"]["name"])["data"]


def nginx_directives(text: str, name: str) -> list[str]:
    """The arguments of every ``name ...;`` directive of an nginx config."""
    return re.findall(rf"^\s*{name}\s+([^;#]+);", text, flags=re.MULTILINE)


def settings() -> dict[str, str]:
    lines = (KUBE / "base" / "settings.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_the_web_deployment(rendered):
    docs = rendered["base"]
    web = one(docs, "Deployment", "digitserve")
    assert web["spec"]["replicas"] == 2
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = web["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["digitserve", "proxy"]
    server = container(pod, "digitserve")
    # Readiness and start-up on /ready (200 only once this pod's model is loaded),
    # liveness on the worker's own /health: all on gunicorn's own port.
    assert server["startupProbe"]["httpGet"] == {"path": "/ready", "port": "gunicorn"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "gunicorn"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "gunicorn"}
    port = next(p for p in server["ports"] if p["name"] == "gunicorn")
    assert f"--http_port={port['containerPort']}" in server["args"]
    # The store read-only, in the pod and in the mount.
    mount = next(m for m in server["volumeMounts"] if m["name"] == "model-store")
    volume = next(v for v in pod["volumes"] if v["name"] == "model-store")
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
    assert f"--model_dir={mount['mountPath']}" in server["args"]


def test_the_service_reaches_nginx_and_nginx_reaches_gunicorn(rendered):
    docs = rendered["base"]
    pod = web_pod(docs)
    proxy, server = container(pod, "proxy"), container(pod, "digitserve")
    (service_port,) = one(docs, "Service", "digitserve")["spec"]["ports"]
    (front,) = proxy["ports"]
    assert service_port["targetPort"] == front["name"]
    assert not [p for p in server["ports"] if p["name"] == service_port["targetPort"]]
    config = nginx_config(docs, pod)
    assert nginx_directives(config["nginx.conf"], "listen") == [str(front["containerPort"])]
    (gunicorn,) = server["ports"]
    (upstream,) = nginx_directives(config["upstream.conf"], "server")
    assert upstream == f"127.0.0.1:{gunicorn['containerPort']}"
    # Clients see the pod ready only once nginx passes /ready on; nginx's own liveness
    # does not go through to gunicorn.
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": front["name"]}
    assert proxy["livenessProbe"]["tcpSocket"] == {"port": front["name"]}
    # Prometheus scrapes the one port the NetworkPolicy opens.
    annotations = one(docs, "Deployment", "digitserve")["spec"]["template"]["metadata"]
    assert annotations["annotations"]["prometheus.io/port"] == str(front["containerPort"])
    policy = one(docs, "NetworkPolicy", "digitserve-server-ingress")["spec"]
    assert [p["port"] for p in policy["ingress"][0]["ports"]] == [front["containerPort"]]


def test_nginx_runs_the_repos_config(rendered):
    """The sidecar's nginx.conf is deploy/nginx/nginx.conf to the byte (compose's image is
    built from the same file); its upstream is deploy/nginx/upstream-kubernetes.conf,
    kept alive as compose's is; and nginx reads them from the ConfigMap's mount."""
    pod = web_pod(rendered["base"])
    proxy = container(pod, "proxy")
    config = nginx_config(rendered["base"], pod)
    nginx_conf = (NGINX / "nginx.conf").read_text()
    assert config == {
        "nginx.conf": nginx_conf,
        "upstream.conf": (NGINX / "upstream-kubernetes.conf").read_text(),
    }
    compose = (NGINX / "upstream.conf").read_text()
    for directive in ("keepalive", "keepalive_timeout", "keepalive_requests"):
        assert nginx_directives(config["upstream.conf"], directive) == nginx_directives(
            compose, directive
        ), directive
    (mount,) = (m for m in proxy["volumeMounts"] if m["name"] == "nginx-config")
    assert mount["readOnly"]
    args = proxy["command"] + proxy["args"]
    assert args[args.index("-c") + 1] == f"{mount['mountPath']}/nginx.conf"
    (include,) = nginx_directives(nginx_conf, "include")
    assert include == f"{mount['mountPath']}/upstream.conf"
    # Everything nginx writes (pid, request bodies, temp files) is on its emptyDir.
    (tmp,) = (m for m in proxy["volumeMounts"] if m["name"] == "proxy-tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "proxy-tmp")
    written = nginx_directives(nginx_conf, "pid") + nginx_directives(nginx_conf, r"\w+_temp_path")
    assert len(written) == 6 and all(p.startswith(tmp["mountPath"] + "/") for p in written)
    assert proxy["image"] == "digitserve-proxy:0.1.0"


def test_termination_grace_covers_the_drain(rendered):
    """preStop sleep + gunicorn's graceful timeout must fit in the grace period, or the
    kubelet's SIGKILL cuts requests in flight."""
    graceful = int(settings()["DIGITSERVE_GRACEFUL_TIMEOUT"])
    web = web_pod(rendered["base"])
    isvc = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    runtime = one(rendered["kserve"], "ServingRuntime")["spec"]
    for grace, server in [
        (web["terminationGracePeriodSeconds"], container(web, "digitserve")),
        (isvc["terminationGracePeriodSeconds"], container(runtime, "kserve-container")),
    ]:
        command = server["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "/bin/sleep"
        assert int(command[1]) + graceful < grace <= int(command[1]) + graceful + 15


def test_nginx_stops_taking_requests_before_gunicorn_drains(rendered):
    """Both preStop hooks start together: nginx must close its socket (while the
    endpoints go) before gunicorn's SIGTERM, or it would forward to a closed socket."""
    web = web_pod(rendered["base"])
    server = container(web, "digitserve")["lifecycle"]["preStop"]["exec"]["command"]
    proxy = container(web, "proxy")["lifecycle"]["preStop"]["exec"]["command"]
    assert proxy[:2] == ["/bin/sh", "-c"]
    steps = [step.strip() for step in proxy[2].split(";")]
    # sleep, then nginx's graceful stop (SIGQUIT to its master), then wait for its end
    assert steps[0].startswith("sleep ") and steps[1] == "kill -QUIT 1", steps
    assert "kill -0 1" in steps[2]
    nginx_quits = int(steps[0].removeprefix("sleep "))
    assert 5 <= nginx_quits < int(server[1])


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
    limit = container(web_pod(rendered["base"]), "digitserve")["resources"]["limits"]["cpu"]
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
    # No nginx sidecar under KServe (docs/kubernetes.md): nor its config.
    assert not [d for d in docs if d["metadata"]["name"].startswith("digitserve-nginx")]
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
