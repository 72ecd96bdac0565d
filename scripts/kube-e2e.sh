#!/usr/bin/env bash
# Kubernetes end-to-end test on one machine: the local overlay of deploy/kubernetes,
# rendered with kubectl kustomize and played for real with podman kube play, the
# images built from the Dockerfile.
#
#   sudo scripts/kube-e2e.sh        # as root; ~5 min with a cached base image
#
# 1. installs what it lacks (podman, runc, buildah, debootstrap, curl, catatonit; util-linux's
#    nsenter) and the tools' virtualenv (.venv-kube: KServe's SDK, PyYAML);
# 2. builds the serving and training images and the proxy's, deploy/nginx
#    (scripts/podman-work.sh);
# 3. renders overlays/local (the trainer's MNIST pointed at a host folder) and
#    overlays/kserve; turns the Jobs into Pods with restartPolicy Never
#    (scripts/kube_local.py: podman 4.3 has no Jobs); Services, HPAs, PDBs and
#    NetworkPolicies are validated only (scripts/validate_manifests.py);
# 4. plays the PVC and the Deployment (2 replicas, each gunicorn behind its nginx
#    sidecar; every request to a replica goes through nginx, the pod's 8080) on the empty
#    store: every replica must answer /ready 503 (nothing to serve yet: readiness is
#    not reported before a model loads); then the seed Job as a Pod; then waits until
#    every replica is ready with every worker serving v1;
# 5. posts real MNIST test digits as PNGs to /predict on each replica, checks that
#    nginx's own errors (a 413 for a body over the limit) and the API's (a 404) are
#    the API's JSON, and runs KServe's SDK (scripts/kserve_conformance.py) against one;
# 6. runs the trainer Job as a Pod on the same volume with a few hundred training
#    images; every replica must then serve the new version, without a restart;
# 7. plays the pod KServe would make from the InferenceService and ServingRuntime
#    (the version folder at /mnt/models, read-only, as a pvc:// storageUri mounts it)
#    and runs KServe's SDK against it;
# 8. stops each replica in the order of a pod's shutdown (docs/kubernetes.md): nginx
#    first (SIGQUIT, its image's stop signal), then gunicorn (SIGTERM); each must exit
#    0 after a graceful shutdown; tears everything down and deletes what it made,
#    failed or not; what a killed earlier run left (its folder in /tmp, its pods and
#    volumes) goes first.
#
# Each replica is reached on its own loopback: the host's curl and Python run inside
# the pod's network namespace (nsenter), so no traffic leaves 127.0.0.1.
#
# Environment (all optional):
#   DIGITSERVE_KUBE_E2E_TIMEOUT   overall bound in seconds (default 1800)
#   DIGITSERVE_E2E_CACHE          base image cache (default ~/.cache/digitserve-e2e)
#   DIGITSERVE_E2E_MNIST          MNIST IDX folder (default $MNIST_DIR, else
#                                 ../shared/data/mnist; else tests/data/mnist-sample)
#   DIGITSERVE_KUBE_TRAIN_IMAGES  training images for the retraining (default 400)
#   DIGITSERVE_KUBE_TRAIN_EPOCHS  its epochs (default 8)
#   DIGITSERVE_KUBE_V2_MIN_ACCURACY  least share of test digits the retrained v2 must
#                                 get right (default 0.5: it saw only those images)
#   DIGITSERVE_KUBE_VENV          the tools' virtualenv (default .venv-kube)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOTAL_TIMEOUT=${DIGITSERVE_KUBE_E2E_TIMEOUT:-1800}
if [[ -z ${_DIGITSERVE_KUBE_E2E_BOUNDED:-} ]]; then
    export _DIGITSERVE_KUBE_E2E_BOUNDED=1
    exec timeout --kill-after=120 "$TOTAL_TIMEOUT" bash "${BASH_SOURCE[0]}" "$@"
fi

export DIGITSERVE_E2E_CACHE=${DIGITSERVE_E2E_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/digitserve-e2e}
MNIST=${DIGITSERVE_E2E_MNIST:-${MNIST_DIR:-$ROOT/../shared/data/mnist}}
TRAIN_IMAGES=${DIGITSERVE_KUBE_TRAIN_IMAGES:-400}
TRAIN_EPOCHS=${DIGITSERVE_KUBE_TRAIN_EPOCHS:-8}      # a few seconds an epoch here
V2_MIN_ACCURACY=${DIGITSERVE_KUBE_V2_MIN_ACCURACY:-0.5}
KUBE_VENV=${DIGITSERVE_KUBE_VENV:-$ROOT/.venv-kube}
[[ $KUBE_VENV == /* ]] || KUBE_VENV=$ROOT/$KUBE_VENV
BASE_TAG=localhost/digitserve-e2e-base:bookworm
SERVE_TAG=localhost/digitserve:kube-e2e     # the names overlays/local gives the images
TRAIN_TAG=localhost/digitserve-train:kube-e2e
PROXY_TAG=localhost/digitserve-proxy:kube-e2e
FRONT=http://127.0.0.1:8080                 # a pod's front door: a replica's nginx
GUNICORN=http://127.0.0.1:8081              # (base/deployment.yaml) and the gunicorn behind
                                            # it; the KServe pod's gunicorn is on 8080
WORKERS=2                                   # DIGITSERVE_WORKERS of base/settings.env
STARTED=$SECONDS

log() { printf '[kube-e2e %4ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
die() { log "FAIL: $*"; exit 1; }
bounded() { local limit=$1; shift; timeout --foreground --kill-after=10 "$limit" "$@"; }
exec 3>&1 4>&2
[[ $(id -u) == 0 ]] || die "run as root (rootful podman, nsenter, debootstrap)"
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 LC_ALL=C.UTF-8
# shellcheck source=scripts/podman-work.sh
. "$ROOT/scripts/podman-work.sh"

# ---- 1. what it needs ----------------------------------------------------------------
command -v kubectl >/dev/null || die "kubectl (with its built-in kustomize) is needed to render"
# catatonit: podman 4.3 builds its pod's pause image from it; podman installed without
# its Recommends (as on this kind of machine) lacks it, and `kube play` fails.
declare -A NEED=([podman]=podman [runc]=runc [buildah]=buildah [debootstrap]=debootstrap
                 [curl]=curl [nsenter]=util-linux [python3]=python3 [catatonit]=catatonit)
missing=()
for cmd in "${!NEED[@]}"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}"); done
if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt"
    bounded 600 apt-get update -qq
    bounded 900 apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [[ ! -f $KUBE_VENV/.installed ]]; then
    log "making the tools' virtualenv $KUBE_VENV (KServe's SDK)"
    bounded 1200 make -C "$ROOT" --no-print-directory "KUBE_VENV=$KUBE_VENV" \
        "$KUBE_VENV/.installed" >/dev/null || die "could not make $KUBE_VENV"
fi
PY=$KUBE_VENV/bin/python

# ---- the work folder; what a killed run left ------------------------------------------
podman_clean_stale digitserve-kube
podman_make_work digitserve-kube
mkdir -p "$WORK/play" "$WORK/overlay"
FAILED_STEP=
cleanup() {
    local rc=$?
    exec 1>&3 2>&4
    trap - EXIT INT TERM
    set +e
    if ((rc != 0)); then
        for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep -v -- '-infra$'); do
            log "logs of $c (last 30 lines):"
            bounded 20 podman logs --tail 30 "$c" 2>&1 | sed 's/^/    /'
        done
    fi
    log "cleaning up"
    for f in "$WORK"/play/*.yaml; do
        [[ -f $f ]] && bounded 90 podman kube down "$f" >/dev/null 2>&1
    done
    podman_reset_work
    if ((rc == 0)); then log "PASSED in $((SECONDS - STARTED)) s"
    else log "FAILED (exit $rc) after $((SECONDS - STARTED)) s"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exec 1>&3 2>&4; log "interrupted (or the ${TOTAL_TIMEOUT}s bound was reached)"; exit 124' INT TERM

# ---- 2. images -----------------------------------------------------------------------
log "images (base cache: $DIGITSERVE_E2E_CACHE)"
podman_images "$BASE_TAG" "$SERVE_TAG" "$TRAIN_TAG"
podman_proxy_image "$BASE_TAG" "$PROXY_TAG"

# ---- 3. render -------------------------------------------------------------------------
if [[ ! -f $MNIST/t10k-images-idx3-ubyte.gz && ! -f $MNIST/t10k-images-idx3-ubyte ]]; then
    log "no MNIST in $MNIST: using the committed sample (set DIGITSERVE_E2E_MNIST)"
    MNIST=$ROOT/tests/data/mnist-sample
fi
MNIST=$(cd "$MNIST" && pwd)
# The committed local overlay, with this machine's MNIST folder and training size
# (kustomize takes a base by a relative path only).
cat > "$WORK/overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$WORK/overlay" "$ROOT/deploy/kubernetes/overlays/local")
patches:
  - target: {kind: Job, name: digitserve-train}
    patch: |-
      - op: replace
        path: /spec/template/spec/volumes/1/hostPath/path
        value: $MNIST
      - op: replace
        path: /spec/template/spec/containers/0/args
        value: [--no-progress, --epochs=$TRAIN_EPOCHS, --limit-train=$TRAIN_IMAGES]
EOF
bounded 60 kubectl kustomize "$WORK/overlay" > "$WORK/local.yaml" || die "rendering overlays/local failed"
bounded 60 kubectl kustomize "$ROOT/deploy/kubernetes/overlays/kserve" > "$WORK/kserve.yaml" \
    || die "rendering overlays/kserve failed"
skipped=$("$PY" "$ROOT/scripts/kube_local.py" split "$WORK/local.yaml" "$WORK/play") \
    || die "could not split the rendered overlay"
log "rendered overlays/local; validated only, not played: $(echo "$skipped" | paste -sd' ')"

# ---- helpers: a replica's own loopback ---------------------------------------------------
# in_pod CONTAINER COMMAND...: run a host command inside the container's network namespace.
in_pod() {
    local pid
    pid=$(podman inspect --format '{{.State.Pid}}' "$1") && ((pid > 0)) || return 1
    nsenter -t "$pid" -n -- "${@:2}"
}
# status_of CONTAINER PATH [CURL ARGS...]: the HTTP status of PATH through the pod's
# nginx; the answer in $WORK/answer.json, its head in $WORK/answer.head.
status_of() {
    # curl writes 000 itself when nothing answers: appending another made "000000".
    local code
    code=$(in_pod "$1" curl -s --noproxy '*' -m 20 -o "$WORK/answer.json" -D "$WORK/answer.head" \
        -w '%{http_code}' "${@:3}" "$FRONT$2" 2>/dev/null) || true
    echo "${code:-000}"
}
via_nginx() { grep -qi '^server: nginx' "$WORK/answer.head"; }  # the last answer's
error_code() {  # the "code" of the last answer, if it has the API's JSON error shape
    "$PY" -c 'import json, sys
error = json.load(sys.stdin)["error"]
print(error["code"] if set(error) == {"code", "message"} else "")' < "$WORK/answer.json" 2>/dev/null
}
worker_versions() {  # the version each gunicorn worker of the pod serves, one a line
    in_pod "$1" curl -sf --noproxy '*' -m 10 "$FRONT/metrics" 2>/dev/null \
        | awk '/^digitserve_model_version\{/ {printf "%d\n", $2}'
}
# wait_serving CONTAINER VERSION SECONDS: ready, every worker on VERSION
wait_serving() {
    local deadline=$((SECONDS + $3)) versions
    while ((SECONDS < deadline)); do
        [[ $(podman inspect --format '{{.State.Running}}' "$1") == true ]] \
            || die "$1 stopped: $(podman inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "$1")"
        if [[ $(status_of "$1" /ready) == 200 ]]; then
            versions=$(worker_versions "$1" | sort -u | paste -sd,)
            if [[ $versions == "$2" && $(worker_versions "$1" | wc -l) == "$WORKERS" ]]; then
                return 0
            fi
        fi
        sleep 1
    done
    die "$1: not every worker serves v$2 after $3 s (workers: $(worker_versions "$1" | paste -sd,))"
}
# run_pod FILE CONTAINER SECONDS LOG: play a Pod made from a Job, wait for it to end.
run_pod() {
    local code
    bounded 120 podman kube play "$1" > "$WORK/logs/play-${2}.log" 2>&1 \
        || { cat "$WORK/logs/play-${2}.log"; die "podman kube play $1 failed"; }
    code=$(bounded "$3" podman wait "$2") || die "$2 did not finish within $3 s"
    podman logs "$2" > "$4" 2>&1
    ((code == 0)) || { tail -n 30 "$4"; die "$2 exited $code"; }
}

# ---- 4. the store, the replicas, the seed --------------------------------------------------
bounded 120 podman kube play "$WORK/play/store.yaml" > "$WORK/logs/play-store.log" 2>&1 \
    || { cat "$WORK/logs/play-store.log"; die "playing the PVC failed"; }
log "PVC digitserve-model-store: volume $(podman volume inspect --format '{{.Mountpoint}}' digitserve-model-store)"
bounded 180 podman kube play "$WORK/play/web.yaml" > "$WORK/logs/play-web.log" 2>&1 \
    || { cat "$WORK/logs/play-web.log"; die "playing the Deployment failed"; }
mapfile -t REPLICAS < <(podman ps --format '{{.Names}}' | grep -E '^digitserve-pod-[0-9]+-digitserve$' | sort)
((${#REPLICAS[@]} == 2)) || die "expected the Deployment's 2 replicas, got: ${REPLICAS[*]:-none}"
for c in "${REPLICAS[@]}"; do
    [[ $(podman inspect --format '{{.State.Running}}' "${c%-digitserve}-proxy" 2>/dev/null) == true ]] \
        || die "${c%-digitserve}: no nginx sidecar running (container ${c%-digitserve}-proxy)"
done
log "Deployment digitserve: replicas ${REPLICAS[*]}, each with its nginx sidecar (-proxy)"

# An empty store: each replica must say it is not ready (a 503), not pass early.
for c in "${REPLICAS[@]}"; do
    deadline=$((SECONDS + 120))
    # 000: nginx not listening yet; 502: nginx is, gunicorn not yet.
    until [[ ! $(status_of "$c" /ready) =~ ^(000|502)$ ]]; do
        ((SECONDS < deadline)) || die "$c: gunicorn never answered through nginx on $FRONT"
        sleep 1
    done
    [[ $(status_of "$c" /v2/health/ready) == 503 ]] || die "$c: /v2/health/ready not 503 on an empty store"
    code=$(status_of "$c" /ready)
    [[ $code == 503 ]] || die "$c answered /ready $code on an empty store (expected 503)"
    via_nginx || die "$c: /ready was not answered through nginx: $(head -c 300 "$WORK/answer.head")"
    code=$(in_pod "$c" curl -s --noproxy '*' -m 10 -o /dev/null -w '%{http_code}' "$GUNICORN/ready") || true
    [[ $code == 503 ]] || die "$c: gunicorn's own /ready (the probes' port) answered ${code:-000}"
    log "$c, empty store: /ready 503 through nginx, and from gunicorn ($(cut -c1-70 "$WORK/answer.json"))"
done

log "seed Job as a Pod (restartPolicy Never)"
run_pod "$WORK/play/digitserve-seed-store.yaml" digitserve-seed-store-seed-store 300 "$WORK/logs/seed.log"
log "seed: $(tail -n 1 "$WORK/logs/seed.log")"
for c in "${REPLICAS[@]}"; do
    wait_serving "$c" 1 180
    log "$c ready: $WORKERS workers on v1"
done

# ---- 5. real digits, and KServe's SDK -------------------------------------------------------
for c in "${REPLICAS[@]}"; do
    out=$(in_pod "$c" "$PY" "$ROOT/scripts/post_digits.py" --url "$FRONT" \
        --mnist "$MNIST" --version 1 --count 20) || die "$c: $out"
    log "$c /predict through nginx: $out"
done
# nginx's own error and the API's, both in the API's JSON shape (as compose's proxy).
head -c 11000000 /dev/zero > "$WORK/big.bin"
for c in "${REPLICAS[@]}"; do
    code=$(status_of "$c" /predict -H 'Content-Type: image/png' --data-binary "@$WORK/big.bin")
    [[ $code == 413 && $(error_code) == payload_too_large ]] \
        || die "$c: an 11 MB body through nginx: $code $(head -c 300 "$WORK/answer.json")"
    via_nginx || die "$c: the 413 was not nginx's own: $(head -c 300 "$WORK/answer.head")"
    code=$(status_of "$c" /models/other)
    [[ $code == 404 && $(error_code) == model_not_found ]] \
        || die "$c: GET /models/other through nginx: $code $(head -c 300 "$WORK/answer.json")"
    log "$c: nginx's own 413 and the API's 404, both as the API's JSON errors"
done
in_pod "${REPLICAS[0]}" "$PY" "$ROOT/scripts/kserve_conformance.py" --url "$FRONT" \
    --model mnist --mnist "$MNIST" --version 1 > "$WORK/logs/conformance-1.log" 2>&1 \
    || { cat "$WORK/logs/conformance-1.log"; die "KServe SDK checks failed on ${REPLICAS[0]}"; }
log "KServe SDK on ${REPLICAS[0]}: $(tail -n 1 "$WORK/logs/conformance-1.log")"
declare -A STARTED_AT
for c in "${REPLICAS[@]}"; do STARTED_AT[$c]=$(podman inspect --format '{{.State.StartedAt}}' "$c"); done

# ---- 6. the trainer on the same volume; every replica swaps ---------------------------------
log "trainer Job as a Pod: $TRAIN_IMAGES training images, $TRAIN_EPOCHS epochs"
t0=$SECONDS
run_pod "$WORK/play/digitserve-train.yaml" digitserve-train-trainer 900 "$WORK/logs/train.log"
grep -q '^published mnist v2 ' "$WORK/logs/train.log" \
    || { tail -n 10 "$WORK/logs/train.log"; die "the trainer did not publish v2"; }
log "trainer done in $((SECONDS - t0)) s: $(grep -h '^published' "$WORK/logs/train.log")"
for c in "${REPLICAS[@]}"; do
    wait_serving "$c" 2 90
    [[ $(podman inspect --format '{{.State.StartedAt}}' "$c") == "${STARTED_AT[$c]}" ]] \
        || die "$c was restarted (expected a hot swap)"
    out=$(in_pod "$c" "$PY" "$ROOT/scripts/post_digits.py" --url "$FRONT" \
        --mnist "$MNIST" --version 2 --count 20 --min-accuracy "$V2_MIN_ACCURACY") || die "$c: $out"
    log "$c swapped to v2 without a restart; /predict: $out"
done

# ---- 7. the pod KServe would make: one version at /mnt/models --------------------------------
VERSION_DIR=$(podman volume inspect --format '{{.Mountpoint}}' digitserve-model-store)/mnist/2
"$PY" "$ROOT/scripts/kube_local.py" predictor "$WORK/kserve.yaml" "$WORK/play/predictor.yaml" \
    --image "$SERVE_TAG" --model-path "$VERSION_DIR" || die "could not build the predictor pod"
bounded 120 podman kube play "$WORK/play/predictor.yaml" > "$WORK/logs/play-predictor.log" 2>&1 \
    || { cat "$WORK/logs/play-predictor.log"; die "playing the predictor pod failed"; }
PREDICTOR=digitserve-predictor-kserve-container
deadline=$((SECONDS + 180))
until [[ $(status_of "$PREDICTOR" /v2/health/ready) == 200 ]]; do
    ((SECONDS < deadline)) || die "the predictor pod is not ready after 180 s"
    [[ $(podman inspect --format '{{.State.Running}}' "$PREDICTOR") == true ]] || die "the predictor pod stopped"
    sleep 1
done
in_pod "$PREDICTOR" "$PY" "$ROOT/scripts/kserve_conformance.py" --url http://127.0.0.1:8080 \
    --model digitserve --mnist "$MNIST" --version 2 --min-accuracy "$V2_MIN_ACCURACY" \
    > "$WORK/logs/conformance-predictor.log" 2>&1 \
    || { cat "$WORK/logs/conformance-predictor.log"; die "KServe SDK checks failed on the predictor"; }
log "KServe predictor pod (ServingRuntime + InferenceService, /mnt/models = mnist/2):" \
    "$(tail -n 1 "$WORK/logs/conformance-predictor.log")"

# ---- 8. graceful stop, teardown --------------------------------------------------------------
# A pod's order (podman runs no preStop hooks): nginx stops taking requests and finishes
# its own, then gunicorn drains. (podman complains on stderr that it cannot reach systemd
# for the healthcheck timers.)
for c in "${REPLICAS[@]}"; do
    proxy=${c%-digitserve}-proxy t0=$SECONDS
    bounded 90 podman stop -t 45 "$proxy" >/dev/null 2>"$WORK/logs/stop.log" \
        || { cat "$WORK/logs/stop.log"; die "podman stop $proxy failed"; }
    code=$(podman inspect --format '{{.State.ExitCode}}' "$proxy")
    ((code == 0)) || die "$proxy exited $code on its stop signal (the image's SIGQUIT)"
    log "$proxy (nginx) stopped gracefully on SIGQUIT in $((SECONDS - t0)) s"
    t0=$SECONDS
    bounded 90 podman stop -t 45 "$c" >/dev/null 2>"$WORK/logs/stop.log" \
        || { cat "$WORK/logs/stop.log"; die "podman stop $c failed"; }
    podman logs "$c" 2>&1 | grep -q 'Shutting down: Master' || die "$c did not shut down gracefully"
    code=$(podman inspect --format '{{.State.ExitCode}}' "$c")
    ((code == 0)) || die "$c exited $code on SIGTERM"
    log "$c stopped gracefully on SIGTERM in $((SECONDS - t0)) s"
done
for f in "$WORK"/play/*.yaml; do
    bounded 90 podman kube down "$f" > /dev/null 2>&1 || die "podman kube down $f failed"
done
bounded 60 podman volume rm digitserve-model-store > /dev/null || die "could not remove the store volume"
# podman makes a volume of each mounted ConfigMap (nginx's), and kube down leaves it.
mapfile -t config_volumes < <(podman volume ls -q | grep '^digitserve-nginx-' || true)
((${#config_volumes[@]} == 0)) || bounded 60 podman volume rm "${config_volumes[@]}" > /dev/null \
    || die "could not remove the volumes of nginx's ConfigMap: ${config_volumes[*]}"
[[ -z $(podman ps -a --format '{{.Names}}') ]] || die "containers left after kube down: $(podman ps -a --format '{{.Names}}')"
log "torn down: no pod, container or volume left"
