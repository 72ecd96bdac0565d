"""Turn rendered overlays into what podman 4.3's `kube play` runs (scripts/kube-e2e.sh).

    python scripts/kube_local.py split RENDERED.yaml OUTDIR
    python scripts/kube_local.py predictor KSERVE.yaml OUT.yaml --image IMAGE \\
        --model-path HOST_FOLDER

``split`` writes OUTDIR/store.yaml (the PersistentVolumeClaims), web.yaml (the
ConfigMaps and Deployments) and one <job>.yaml a Job: its pod template as a Pod
with restartPolicy Never, as podman has no Jobs before version 5. It prints what
podman would skip (Services, HPAs, PDBs, NetworkPolicies, Namespaces): those are
validated only (scripts/validate_manifests.py).

``predictor`` builds the pod KServe would make from the KServe overlay's
InferenceService and ServingRuntime: the runtime's containers, {{.Name}} in their
arguments replaced by the InferenceService's name, the predictor's pod settings,
and the model folder at /mnt/models, read-only, as a pvc:// storageUri mounts it
(here a host folder: the store volume's version folder). With the overlay's
ConfigMaps, so envFrom resolves.

Both drop the containers' ``ports``: podman 4.3 publishes every containerPort on
the host (all addresses, the same port), so a second replica cannot start and the
server would be reachable from outside. The pods are reached in their own network
namespace instead (nsenter). Probes naming a port get its number (podman turns a
liveness probe into a healthcheck, which it never runs here without systemd).

Needs PyYAML (the tools' virtualenv has it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

PLAYED = ("PersistentVolumeClaim", "ConfigMap", "Deployment", "Job")
MODEL_DIR = "/mnt/models"
# Set by KServe on the pods it makes; podman has nothing to match them against.
POD_FIELDS = (
    "securityContext",
    "terminationGracePeriodSeconds",
    "automountServiceAccountToken",
    "enableServiceLinks",
)


def unpublished(spec: dict) -> dict:
    """A pod spec whose containers publish nothing (see the module's docstring)."""
    for container in spec.get("containers", []):
        named = {p["name"]: p["containerPort"] for p in container.pop("ports", []) if "name" in p}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for kind in ("httpGet", "tcpSocket"):
                action = (container.get(probe) or {}).get(kind) or {}
                if action.get("port") in named:
                    action["port"] = named[action["port"]]
    return spec


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dump(path: Path, docs: list[dict]) -> None:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def job_pod(job: dict) -> dict:
    """A Job's pod template as a Pod of the Job's name, run once."""
    template = copy.deepcopy(job["spec"]["template"])
    labels = {**job["metadata"].get("labels", {}), **template.get("metadata", {}).get("labels", {})}
    spec = unpublished(template["spec"])
    spec["restartPolicy"] = "Never"
    metadata = {"name": job["metadata"]["name"], "labels": labels}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def split(rendered: Path, out: Path) -> list[str]:
    docs = load(rendered)
    out.mkdir(parents=True, exist_ok=True)
    dump(out / "store.yaml", [d for d in docs if d["kind"] == "PersistentVolumeClaim"])
    web = [d for d in docs if d["kind"] in ("ConfigMap", "Deployment")]
    for deployment in (d for d in web if d["kind"] == "Deployment"):
        unpublished(deployment["spec"]["template"]["spec"])
    dump(out / "web.yaml", web)
    for job in (d for d in docs if d["kind"] == "Job"):
        dump(out / f"{job['metadata']['name']}.yaml", [job_pod(job)])
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] not in PLAYED)


def predictor(rendered: Path, image: str, model_path: Path) -> list[dict]:
    docs = load(rendered)
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    name = isvc["metadata"]["name"]
    spec = isvc["spec"]["predictor"]
    runtimes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServingRuntime"}
    runtime = runtimes[spec["model"]["runtime"]]["spec"]
    containers = copy.deepcopy(runtime["containers"])
    for container in containers:
        container["image"] = image
        container["imagePullPolicy"] = "Never"
        container["args"] = [a.replace("{{.Name}}", name) for a in container.get("args", [])]
        if container["name"] == "kserve-container":
            mounts = container.setdefault("volumeMounts", [])
            mounts.append({"name": "kserve-pvc-source", "mountPath": MODEL_DIR, "readOnly": True})
    volumes = copy.deepcopy(runtime.get("volumes", []))
    volumes.append(
        {
            "name": "kserve-pvc-source",
            "hostPath": {"path": str(model_path), "type": "Directory"},
        }
    )
    pod_spec = {k: copy.deepcopy(spec[k]) for k in POD_FIELDS if k in spec}
    pod_spec |= {"restartPolicy": "Always", "containers": containers, "volumes": volumes}
    unpublished(pod_spec)
    labels = {
        **runtime.get("labels", {}),
        "serving.kserve.io/inferenceservice": name,
        "component": "predictor",
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-predictor",
            "labels": labels,
            "annotations": runtime.get("annotations", {}),
        },
        "spec": pod_spec,
    }
    return [d for d in docs if d["kind"] == "ConfigMap"] + [pod]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("rendered", type=Path)
    s.add_argument("out", type=Path)
    pr = sub.add_parser("predictor")
    pr.add_argument("rendered", type=Path)
    pr.add_argument("out", type=Path)
    pr.add_argument("--image", required=True)
    pr.add_argument("--model-path", required=True, type=Path)
    args = p.parse_args(argv)
    if args.command == "split":
        for skipped in split(args.rendered, args.out):
            print(skipped)
    else:
        dump(args.out, predictor(args.rendered, args.image, args.model_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
