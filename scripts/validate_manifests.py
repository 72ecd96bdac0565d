"""Validate every Kubernetes overlay as rendered, without a cluster.

    make kube-validate          # or: .venv-kube/bin/python scripts/validate_manifests.py

For each of deploy/kubernetes/{base,overlays/kserve,overlays/local}:

1. ``kubectl kustomize`` renders it (offline; nothing contacts a server);
2. the core kinds go through ``kubernetes-validate --strict`` against Kubernetes
   1.32's schemas: unknown fields, wrong types and missing required fields fail;
3. the KServe kinds (ServingRuntime, InferenceService) are checked against the
   schema that KServe's own Python SDK carries: its generated models (and the
   Kubernetes client's, for the pod fields they embed) give every field's type;
   an unknown field or a wrong type fails, and building each model runs the SDK's
   required-field and enum checks; then what ties them together (the runtime's
   container name, protocol and model format, the storageUri's volume);
4. the web Deployment's nginx sidecar (issue 12): it is there, the Service's
   targetPort is its port, it runs deploy/nginx/nginx.conf as it is (from a mounted
   ConfigMap), and it is locked down like the server;
5. ``checkov`` scans it, with the skips of deploy/kubernetes/checkov.yaml (each
   justified there).

``--self-test`` first breaks rendered manifests on purpose (a misspelled field, a
wrong type, a missing required field, in core and KServe kinds) and fails unless
each is caught, so a validator that passes everything cannot go unnoticed.
Exit status 0 when all is well, 1 otherwise. Needs the tools of
deploy/kubernetes/requirements-tools.txt (`make .venv-kube/.installed`) and kubectl.
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
OVERLAYS = {
    "base": KUBE / "base",
    "kserve": KUBE / "overlays" / "kserve",
    "local": KUBE / "overlays" / "local",
}
KUBERNETES_VERSION = "1.32.0"
BIN = Path(sys.executable).parent  # the tools' virtualenv
KSERVE_GROUP = "serving.kserve.io"
KSERVE_MODELS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
}
# Names the SDK's models use for types it does not define itself.
ALIASES = {"K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy"}


def render(overlay: Path) -> str:
    run = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    if run.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay} failed:\n{run.stderr}")
    return run.stdout


def is_kserve(doc: dict) -> bool:
    return str(doc.get("apiVersion", "")).startswith(KSERVE_GROUP + "/")


# -- 2. core kinds -----------------------------------------------------------------
def check_core(docs: list[dict], work: Path) -> list[str]:
    core = [d for d in docs if not is_kserve(d)]
    if not core:
        return []
    path = work / "core.yaml"
    path.write_text(yaml.safe_dump_all(core, sort_keys=False))
    run = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode == 0:
        return []
    return [f"kubernetes-validate: {line}" for line in (run.stdout + run.stderr).splitlines()]


# -- 3. KServe kinds ------------------------------------------------------------------
def _model_class(name: str) -> Any:
    import kserve.models as kserve_models
    import kubernetes.client.models as k8s_models

    name = ALIASES.get(name, name)
    for module in (kserve_models, k8s_models):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no model {name} in the KServe SDK or the Kubernetes client")


# The generated models spell containers list[X], List[X], dict(str, X) or Dict[str, X].
LIST_TYPE = re.compile(r"(?:list|List)\[(.+)\]")
MAP_TYPE = re.compile(r"dict\(str, (.+)\)|Dict\[str, (.+)\]")
PRIMITIVES: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "datetime": lambda v: isinstance(v, str),
    "date": lambda v: isinstance(v, str),
    "object": lambda v: True,  # IntOrString, Quantity, free-form
}


def check_model(data: Any, type_name: str, where: str, errors: list[str]) -> None:
    """``data`` against the SDK's type ``type_name``: every field known and of its
    type, and the model's own checks (required fields, enums) when it is built."""
    if data is None:
        return
    if listed := LIST_TYPE.fullmatch(type_name):
        if not isinstance(data, list):
            errors.append(f"{where}: expected a list, not {type(data).__name__}")
            return
        for i, item in enumerate(data):
            check_model(item, listed[1], f"{where}[{i}]", errors)
        return
    if mapped := MAP_TYPE.fullmatch(type_name):
        if not isinstance(data, dict):
            errors.append(f"{where}: expected a map, not {type(data).__name__}")
            return
        for key, value in data.items():
            check_model(value, mapped[1] or mapped[2], f"{where}.{key}", errors)
        return
    if type_name in PRIMITIVES:
        if not PRIMITIVES[type_name](data):
            errors.append(f"{where}: expected {type_name}, not {data!r}")
        return
    klass = _model_class(type_name)
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a {type_name} object, not {data!r}")
        return
    by_key = {key: attr for attr, key in klass.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        attr = by_key.get(key)
        if attr is None:
            errors.append(f"{where}.{key}: unknown field of {type_name}")
            continue
        check_model(value, klass.openapi_types[attr], f"{where}.{key}", errors)
        kwargs[attr] = value
    try:
        klass(**kwargs)  # the generated setters: required fields, enums
    except (ValueError, TypeError) as exc:
        errors.append(f"{where}: {type_name}: {exc}")


def check_kserve(docs: list[dict]) -> list[str]:
    errors: list[str] = []
    for doc in docs:
        if not is_kserve(doc):
            continue
        key = (doc.get("apiVersion"), doc.get("kind"))
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if key not in KSERVE_MODELS:
            errors.append(f"{where}: {key} is not a KServe kind this checker knows")
            continue
        check_model(doc, KSERVE_MODELS[key], where, errors)
    return errors + check_kserve_wiring(docs)


def check_kserve_wiring(docs: list[dict]) -> list[str]:
    """What the schemas cannot say: each InferenceService's runtime exists and serves
    its model format over its protocol; the runtime's container is the one KServe
    looks for and has an HTTP readiness probe; a pvc:// storageUri names a claim."""
    runtimes = {
        d["metadata"]["name"]: d["spec"]
        for d in docs
        if d.get("kind") in ("ServingRuntime", "ClusterServingRuntime")
    }
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    errors = []
    for name, spec in runtimes.items():
        containers = {c.get("name"): c for c in spec.get("containers", [])}
        main = containers.get("kserve-container")
        if main is None:
            errors.append(f"ServingRuntime/{name}: no container named kserve-container")
            continue
        probe = (main.get("readinessProbe") or {}).get("httpGet")
        if not probe or not str(probe.get("path", "")).startswith("/v2/health/ready"):
            errors.append(
                f"ServingRuntime/{name}: kserve-container needs an HTTP readiness probe on "
                "/v2/health/ready (KServe's default TCP probe passes before the model loads)"
            )
    for doc in docs:
        if doc.get("kind") != "InferenceService":
            continue
        where = f"InferenceService/{doc['metadata']['name']}"
        model = doc.get("spec", {}).get("predictor", {}).get("model") or {}
        runtime = runtimes.get(model.get("runtime"))
        if runtime is None:
            errors.append(
                f"{where}: runtime {model.get('runtime')!r} is not among {sorted(runtimes)}"
            )
            continue
        formats = {f.get("name") for f in runtime.get("supportedModelFormats", [])}
        if (model.get("modelFormat") or {}).get("name") not in formats:
            errors.append(f"{where}: model format is not one of {sorted(formats)}")
        protocol = model.get("protocolVersion")
        if protocol and protocol not in runtime.get("protocolVersions", []):
            errors.append(f"{where}: protocol {protocol} is not the runtime's")
        uri = str(model.get("storageUri", ""))
        if uri.startswith("pvc://") and uri[6:].split("/", 1)[0] not in claims:
            errors.append(f"{where}: {uri} names no PersistentVolumeClaim of the overlay")
    return errors


# -- 4. the nginx sidecar ---------------------------------------------------------------
WEB = "digitserve"  # the Deployment and Service of the base (KServe makes its own)
SIDECAR = "proxy"


def check_sidecar(docs: list[dict]) -> list[str]:
    """The web pod has nginx in front of gunicorn: a container ``proxy`` whose port the
    Service targets, reading deploy/nginx/nginx.conf (byte for byte) from a ConfigMap it
    mounts, without privileges, root or a writable root filesystem."""
    web = [d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == WEB]
    if not web:
        return []
    pod = web[0]["spec"]["template"]["spec"]
    proxy = next((c for c in pod.get("containers", []) if c.get("name") == SIDECAR), None)
    where = f"Deployment/{WEB}"
    if proxy is None:
        return [f"{where}: no nginx sidecar (a container named {SIDECAR})"]
    errors = []
    ports = {p.get("name"): p.get("containerPort") for p in proxy.get("ports", [])}
    for service in (d for d in docs if d.get("kind") == "Service"):
        if service["metadata"]["name"] != WEB:
            continue
        for port in service.get("spec", {}).get("ports", []):
            if port.get("targetPort") not in {*ports, *ports.values()}:
                errors.append(
                    f"Service/{WEB}: targetPort {port.get('targetPort')!r} is not nginx's "
                    f"(the {SIDECAR} container's ports: {ports})"
                )
    config_maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    volumes = {v.get("name"): v for v in pod.get("volumes", [])}
    repo_conf = NGINX_CONF.read_text()
    conf_dirs = []  # where the proxy mounts a ConfigMap holding the repo's nginx.conf
    for mount in proxy.get("volumeMounts", []):
        source = volumes.get(mount.get("name"), {}).get("configMap") or {}
        files = (config_maps.get(source.get("name")) or {}).get("data", {})
        if files.get("nginx.conf") == repo_conf:
            conf_dirs.append(mount.get("mountPath"))
    command = [*proxy.get("command", []), *proxy.get("args", [])]
    conf = command[command.index("-c") + 1] if "-c" in command[:-1] else None
    if conf not in {f"{d}/nginx.conf" for d in conf_dirs}:
        errors.append(
            f"{where}: nginx must run deploy/nginx/nginx.conf as it is, from a ConfigMap it "
            f"mounts (-c {conf}; mounted copies of the repo's file: {conf_dirs})"
        )
    security = proxy.get("securityContext", {})
    pod_security = pod.get("securityContext", {})
    # The container's own setting wins over the pod's.
    non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    locked = {
        "allowPrivilegeEscalation: false": security.get("allowPrivilegeEscalation") is False,
        "readOnlyRootFilesystem: true": security.get("readOnlyRootFilesystem") is True,
        "capabilities.drop: [ALL]": security.get("capabilities", {}).get("drop") == ["ALL"],
        "runAsNonRoot: true (a user other than 0)": non_root is True and user != 0,
    }
    errors += [
        f"{where}: the {SIDECAR} container lacks {what}" for what, ok in locked.items() if not ok
    ]
    return errors


# -- 5. checkov ----------------------------------------------------------------------
def check_checkov(text: str, work: Path) -> list[str]:
    path = work / "rendered.yaml"
    path.write_text(text)
    run = subprocess.run(
        [str(BIN / "checkov"), "--config-file", str(KUBE / "checkov.yaml"), "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode == 0 and "Failed checks: 0" in run.stdout:
        return []
    failed = [
        line.strip() for line in run.stdout.splitlines() if "FAILED" in line or "Check:" in line
    ]
    return [f"checkov: {line}" for line in failed] or [
        f"checkov exited {run.returncode}: {run.stderr[-2000:]}"
    ]


def validate(text: str, *, security: bool = True) -> list[str]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    with tempfile.TemporaryDirectory() as tmp:
        errors = check_core(docs, Path(tmp)) + check_kserve(docs) + check_sidecar(docs)
        if security:
            errors += check_checkov(text, Path(tmp))
    return errors


# -- --self-test -------------------------------------------------------------------------
def _find(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d.get("kind") == kind)


def _breakages() -> list[tuple[str, str, Callable[[list[dict]], None], bool]]:
    """(what, overlay, how to break it, needs checkov to see it)."""

    def deployment(docs: list[dict]) -> dict:
        return _find(docs, "Deployment")["spec"]["template"]["spec"]

    def predictor(docs: list[dict]) -> dict:
        return _find(docs, "InferenceService")["spec"]["predictor"]

    def runtime(docs: list[dict]) -> dict:
        return _find(docs, "ServingRuntime")["spec"]

    def proxy(docs: list[dict]) -> dict:
        return next(c for c in deployment(docs)["containers"] if c["name"] == SIDECAR)

    def drop_proxy(docs: list[dict]) -> None:
        deployment(docs)["containers"].remove(proxy(docs))

    def edit_nginx_conf(docs: list[dict]) -> None:
        data = next(d for d in docs if "nginx.conf" in d.get("data", {}))["data"]
        data["nginx.conf"] = data["nginx.conf"].replace("listen 8080;", "listen 8081;")

    return [
        (
            "a misspelled Deployment field",
            "base",
            lambda d: _find(d, "Deployment")["spec"].update(replica=2),
            False,
        ),
        (
            "a probe port of the wrong type",
            "base",
            lambda d: deployment(d)["containers"][0]["readinessProbe"]["httpGet"].update(
                port=[8080]
            ),
            False,
        ),
        (
            "a container without a name",
            "base",
            lambda d: deployment(d)["containers"][0].pop("name"),
            False,
        ),
        (
            "an unknown InferenceService field",
            "kserve",
            lambda d: predictor(d).update(minReplica=2),
            False,
        ),
        (
            "minReplicas as a string",
            "kserve",
            lambda d: predictor(d).update(minReplicas="two"),
            False,
        ),
        (
            "a model format without a name",
            "kserve",
            lambda d: predictor(d)["model"]["modelFormat"].pop("name"),
            False,
        ),
        (
            "a runtime container with a misspelled field",
            "kserve",
            lambda d: runtime(d)["containers"][0].update(readinesProbe={}),
            False,
        ),
        (
            "a runtime container without a name",
            "kserve",
            lambda d: runtime(d)["containers"][0].pop("name"),
            False,
        ),
        (
            "a runtime without kserve-container",
            "kserve",
            lambda d: runtime(d)["containers"][0].update(name="server"),
            False,
        ),
        (
            "a runtime with only a TCP readiness probe",
            "kserve",
            lambda d: runtime(d)["containers"][0].update(
                readinessProbe={"tcpSocket": {"port": 8080}}
            ),
            False,
        ),
        (
            "an InferenceService naming another runtime",
            "kserve",
            lambda d: predictor(d)["model"].update(runtime="kserve-mlserver"),
            False,
        ),
        ("a web pod without the nginx sidecar", "base", drop_proxy, False),
        (
            "a Service that skips nginx",
            "base",
            lambda d: _find(d, "Service")["spec"]["ports"][0].update(targetPort="gunicorn"),
            False,
        ),
        ("an nginx.conf that is not the repo's", "local", edit_nginx_conf, False),
        (
            "nginx reading the image's config, not the ConfigMap",
            "base",
            lambda d: proxy(d).update(args=["-e", "stderr", "-c", "/etc/nginx/nginx.conf"]),
            False,
        ),
        (
            "a proxy that may escalate its privileges",
            "local",
            lambda d: proxy(d)["securityContext"].update(allowPrivilegeEscalation=True),
            False,
        ),
        (
            "a proxy running as root",
            "base",
            lambda d: proxy(d)["securityContext"].update(runAsUser=0),
            False,
        ),
        (
            "a privileged proxy",
            "base",
            lambda d: proxy(d)["securityContext"].update(privileged=True),
            True,
        ),
        (
            "a privileged container",
            "base",
            lambda d: deployment(d)["containers"][0]["securityContext"].update(privileged=True),
            True,
        ),
        (
            "a writable root filesystem",
            "local",
            lambda d: deployment(d)["containers"][0]["securityContext"].update(
                readOnlyRootFilesystem=False
            ),
            True,
        ),
    ]


def self_test(rendered: dict[str, str]) -> list[str]:
    missed = []
    for what, overlay, breaks, security in _breakages():
        docs = [d for d in yaml.safe_load_all(rendered[overlay]) if d]
        broken = copy.deepcopy(docs)
        breaks(broken)
        errors = validate(yaml.safe_dump_all(broken, sort_keys=False), security=security)
        print(f"  self-test: {what}: {'caught' if errors else 'MISSED'}")
        if errors:
            print(f"    {errors[0][:160]}")
        else:
            missed.append(f"self-test: {what} ({overlay}) was not caught")
    return missed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--self-test", action="store_true", help="also check that breakage is caught")
    args = p.parse_args(argv)
    rendered = {name: render(path) for name, path in OVERLAYS.items()}
    failures = []
    for name, text in rendered.items():
        docs = [d for d in yaml.safe_load_all(text) if d]
        kinds = sorted({d["kind"] for d in docs})
        errors = validate(text)
        print(
            f"{name}: {len(docs)} resources ({', '.join(kinds)}): "
            f"{'OK' if not errors else f'{len(errors)} problem(s)'}"
        )
        for error in errors:
            print(f"  {error}")
        failures += errors
    if args.self_test:
        failures += self_test(rendered)
    print("manifests: " + ("all valid" if not failures else f"{len(failures)} problem(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
