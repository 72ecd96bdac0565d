#!/usr/bin/env bash
# Container end-to-end test: the Dockerfile and docker-compose.yml, built and run
# for real with podman (rootful) behind its Docker-compatible API and docker-compose.
#
#   sudo scripts/container-e2e.sh          # as root; about 2 min with a cached base, 3 cold
#
# 1. installs what it needs from Debian if missing (podman, runc, debootstrap,
#    docker-compose, curl, python3);
# 2. makes a local bookworm + Python 3.11 base image (scripts/make-base-image.sh;
#    its debootstrap rootfs is cached in $DIGITSERVE_E2E_CACHE between runs);
# 3. builds the serving, training and proxy (nginx) images with --build-arg BASE_IMAGE=...;
# 4. `docker-compose up -d`, waits for the healthcheck (run by hand: podman
#    schedules healthchecks through systemd, absent here), checks that web runs with a
#    read-only root and a read-only store (and the proxy with a read-only root), posts
#    real MNIST test digits as PNGs to /predict through the proxy on 127.0.0.1 and
#    checks the answers, and the proxy's own errors (413) and the API's (404) as JSON;
# 5. `docker-compose --profile train run --rm trainer` retrains on a small subset:
#    once under an unreachable --min-accuracy (nothing may be published), then for
#    real, publishing the next version into the store volume; checks that `web`
#    serves it without a restart (hot swap); then `docker-compose stop web` under load
#    (scripts/drain_probe.py on web's own port, published for the test only): every
#    request web received is answered, web exits 0, and the proxy answers a JSON 502;
# 6. brings everything down and deletes everything it made (containers, volumes,
#    networks, images, podman's storage, the API service), failed or not.
#    Only the base rootfs cache is kept.
#
# Environment (all optional):
#   DIGITSERVE_E2E_CACHE         cache folder (default ~/.cache/digitserve-e2e)
#   DIGITSERVE_E2E_TIMEOUT       overall bound in seconds (default 1200)
#   DIGITSERVE_E2E_MNIST         MNIST IDX folder (default $MNIST_DIR, else
#                                ../shared/data/mnist beside the repository); when
#                                absent, the committed sample tests/data/mnist-sample
#                                (1,000 training images) is used for the retraining
#   DIGITSERVE_E2E_TRAIN_ARGS    trainer arguments (default "--epochs 2 --limit-train 5000";
#                                on the sample, none: the full recipe)
#   DIGITSERVE_E2E_RETRAIN_MIN_ACCURACY  the retrain's floor on the test set (0.94)
#   DIGITSERVE_E2E_DIGITS        how many test digits to post (default 20)
#   DIGITSERVE_E2E_MIN_ACCURACY  least share of them the shipped model must get right (0.9)
#   DIGITSERVE_E2E_KEEP_IMAGES=1 keep the built images' storage (for a look afterwards;
#                                the work folder is then left in place and named)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOTAL_TIMEOUT=${DIGITSERVE_E2E_TIMEOUT:-1200}

# The overall bound: run the whole script under timeout(1). On expiry every process
# of the run gets SIGTERM; the EXIT trap below still cleans up (with 120 s to do it).
if [[ -z ${_DIGITSERVE_E2E_BOUNDED:-} ]]; then
    export _DIGITSERVE_E2E_BOUNDED=1
    exec timeout --kill-after=120 "$TOTAL_TIMEOUT" bash "${BASH_SOURCE[0]}" "$@"
fi

CACHE=${DIGITSERVE_E2E_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/digitserve-e2e}
MNIST=${DIGITSERVE_E2E_MNIST:-${MNIST_DIR:-$ROOT/../shared/data/mnist}}
TRAIN_ARGS=${DIGITSERVE_E2E_TRAIN_ARGS:---epochs 2 --limit-train 5000}  # 96.5% at seed 42
RETRAIN_MIN_ACCURACY=${DIGITSERVE_E2E_RETRAIN_MIN_ACCURACY:-0.94}
N_DIGITS=${DIGITSERVE_E2E_DIGITS:-20}
MIN_ACCURACY=${DIGITSERVE_E2E_MIN_ACCURACY:-0.9}
BASE_TAG=localhost/digitserve-e2e-base:bookworm
SERVE_TAG=localhost/digitserve:e2e
TRAIN_TAG=localhost/digitserve-train:e2e
PROXY_TAG=localhost/digitserve-proxy:e2e
STARTED=$SECONDS

log() { printf '[e2e %4ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
die() { log "FAIL: $*"; exit 1; }
# Every step that could hang runs under its own timeout (in the foreground
# process group, so the overall bound still reaches its children).
bounded() { local limit=$1; shift; timeout --foreground --kill-after=10 "$limit" "$@"; }

# The caller's stdout/stderr, kept on fds 3 and 4: a trap can fire while a
# function's output is redirected to a log file, and must still report here.
exec 3>&1 4>&2
[[ $(id -u) == 0 ]] || die "run as root (rootful podman, debootstrap)"
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
export LC_ALL=C.UTF-8

# ---- 1. packages ---------------------------------------------------------------
declare -A NEED=([podman]=podman [runc]=runc [debootstrap]=debootstrap
                 [docker-compose]=docker-compose [curl]=curl [python3]=python3)
missing=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} (and podman's companions) with apt"
    bounded 600 apt-get update -qq
    bounded 900 apt-get install -y -qq podman buildah runc debootstrap docker-compose curl \
        python3 >/dev/null
fi

# ---- the work folder: podman's config, storage, socket and logs ------------------
mkdir -p "$CACHE"
# shellcheck source=scripts/podman-work.sh
. "$ROOT/scripts/podman-work.sh"
podman_clean_stale digitserve-e2e      # what a run killed outright left behind
podman_make_work digitserve-e2e
mkdir -p "$WORK/digits" "$WORK/responses"
export DIGITSERVE_E2E_CACHE=$CACHE
SOCK=$WORK/podman.sock
PODMAN_PID=
COMPOSE_UP=
export DOCKER_HOST=unix://$SOCK
export COMPOSE_PROJECT_NAME=digitserve-e2e-$$
export COMPOSE_FILE=$ROOT/docker-compose.yml
export COMPOSE_HTTP_TIMEOUT=120
export DIGITSERVE_IMAGE=$SERVE_TAG DIGITSERVE_TRAIN_IMAGE=$TRAIN_TAG BASE_IMAGE=$BASE_TAG
export DIGITSERVE_PROXY_IMAGE=$PROXY_TAG PROXY_BASE_IMAGE=$BASE_TAG
export DIGITSERVE_PUBLISH_ADDR=127.0.0.1

cleanup() {
    local rc=$?
    exec 1>&3 2>&4
    trap - EXIT INT TERM
    set +e
    if ((rc != 0)) && [[ -n $COMPOSE_UP ]]; then
        log "logs of the stack (last 60 lines):"
        bounded 30 podman logs --tail 60 "${WEB_ID:-none}" 2>&1 | sed 's/^/    /'
    fi
    log "cleaning up"
    if [[ -n $COMPOSE_UP && -S $SOCK ]] && kill -0 "$PODMAN_PID" 2>/dev/null; then
        bounded 90 docker-compose --profile train down -v --remove-orphans -t 10 \
            > "$WORK/logs/down.log" 2>&1 || log "compose down failed; removing with podman"
    fi
    if [[ -n $PODMAN_PID ]]; then
        kill "$PODMAN_PID" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$PODMAN_PID" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$PODMAN_PID" 2>/dev/null
        wait "$PODMAN_PID" 2>/dev/null
    fi
    if [[ -n ${DIGITSERVE_E2E_KEEP_IMAGES:-} ]]; then
        bounded 60 podman rm -a -f -t 3 >/dev/null 2>&1
        bounded 60 podman volume rm -a -f >/dev/null 2>&1
        log "kept the images in $WORK (CONTAINERS_CONF=$WORK/containers.conf" \
            "CONTAINERS_STORAGE_CONF=$WORK/storage.conf podman images)"
    else
        podman_reset_work
    fi
    if ((rc == 0)); then
        log "PASSED in $((SECONDS - STARTED)) s"
    else
        log "FAILED (exit $rc) after $((SECONDS - STARTED)) s"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exec 1>&3 2>&4; log "interrupted (or the overall ${TOTAL_TIMEOUT}s bound was reached)"; exit 124' INT TERM

# ---- 2. and 3. the base image and the images -------------------------------------
# Built with podman (compose builds would not share its layer cache), tagged with the
# names compose is told to use; docker format keeps HEALTHCHECK.
[[ -f $ROOT/model_store/mnist/1/manifest.json ]] \
    || die "model_store/mnist/1 (the shipped model) is missing: the serving image needs it"
log "base image $BASE_TAG (rootfs cache: $CACHE), then the images"
podman_images "$BASE_TAG" "$SERVE_TAG" "$TRAIN_TAG"
podman_proxy_image "$BASE_TAG" "$PROXY_TAG"
podman run --rm --network none --no-healthcheck --entrypoint sh "$SERVE_TAG" -c \
    'id -u | grep -qvx 0 && ! python -c "import tqdm" 2>/dev/null && ! test -e training' \
    || die "the serving image runs as root or holds training code/dependencies"

# ---- 4. the stack ------------------------------------------------------------------
podman system service --time=0 "unix://$SOCK" > "$WORK/logs/podman-service.log" 2>&1 &
PODMAN_PID=$!
for _ in $(seq 60); do
    curl -sf -m 2 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 && break
    kill -0 "$PODMAN_PID" 2>/dev/null || die "podman system service exited"
    sleep 0.5
done
curl -sf -m 2 --unix-socket "$SOCK" http://d/_ping >/dev/null || die "podman API did not start"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
export DIGITSERVE_PUBLISH_PORT=$PORT
URL=http://127.0.0.1:$PORT        # the proxy: the deployment's front door
# web's own port, published for this test only (compose publishes just the proxy): the
# drain check must see what gunicorn itself does with each request.
WEB_PORT=$(free_port)
WEB_URL=http://127.0.0.1:$WEB_PORT
cat > "$WORK/compose.e2e.yml" <<EOF
services:
  web:
    ports:
      - "127.0.0.1:$WEB_PORT:8000"
EOF
export COMPOSE_FILE=$ROOT/docker-compose.yml:$WORK/compose.e2e.yml
if [[ ! -f $MNIST/train-images-idx3-ubyte.gz && ! -f $MNIST/train-images-idx3-ubyte ]]; then
    log "no MNIST in $MNIST: retraining on the committed sample (set DIGITSERVE_E2E_MNIST)"
    MNIST=$ROOT/tests/data/mnist-sample
    TRAIN_ARGS=${DIGITSERVE_E2E_TRAIN_ARGS:-}  # the full recipe: 97.4% of the sample's 500
fi
MNIST=$(cd "$MNIST" && pwd)
export DIGITSERVE_MNIST_DATA=$MNIST

bounded 60 docker-compose --profile train config -q || die "docker-compose config failed"
log "docker-compose up -d (web on $URL)"
COMPOSE_UP=1
bounded 300 docker-compose up -d --no-build > "$WORK/logs/up.log" 2>&1 \
    || { cat "$WORK/logs/up.log"; die "docker-compose up failed"; }
WEB_ID=$(bounded 30 docker-compose ps -q web)
[[ -n $WEB_ID ]] || die "no web container"

wait_healthy() {  # podman runs no healthchecks by itself here: run them by hand
    local deadline=$((SECONDS + $1))
    while ((SECONDS < deadline)); do
        [[ $(podman inspect --format '{{.State.Running}}' "$WEB_ID") == true ]] \
            || die "web stopped: $(podman inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "$WEB_ID")"
        if bounded 15 podman healthcheck run "$WEB_ID" >/dev/null 2>&1; then
            return 0
        fi
        sleep 2
    done
    die "web not healthy after $1 s"
}
wait_healthy 180
PROXY_ID=$(bounded 30 docker-compose ps -q proxy)
[[ -n $PROXY_ID ]] || die "no proxy container"
for _ in $(seq 60); do curl -sf -m 5 "$URL/ready" >/dev/null 2>&1 && break; sleep 0.5; done
log "web is healthy, through the proxy: $(curl -sf -m 5 "$URL/ready")"
curl -sf -m 5 "$URL/health" >/dev/null || die "/health failed"
started_at=$(podman inspect --format '{{.State.StartedAt}} restarts={{.RestartCount}}' "$WEB_ID")

# json FILE EXPR: evaluate a Python expression on the parsed JSON document `d`.
json() { python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$@"; }

metadata_version() {
    bounded 10 curl -sf -m 5 "$URL/metadata" -o "$WORK/responses/metadata.json" || return 1
    json "$WORK/responses/metadata.json" 'd["version"]'
}

# Read-only: web's root and its store mount, the proxy's root.
for id in "$WEB_ID" "$PROXY_ID"; do
    [[ $(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$id") == true ]] \
        || die "$(podman inspect --format '{{.Name}}' "$id") does not run with a read-only root"
done
store_rw=$(podman inspect --format \
    '{{range .Mounts}}{{if eq .Destination "/app/model_store"}}{{.RW}}{{end}}{{end}}' "$WEB_ID")
[[ $store_rw == false ]] || die "web's model store is mounted read-write ($store_rw)"
for path in /app/probe /app/model_store/probe /opt/venv/probe; do
    ! bounded 30 podman exec "$WEB_ID" sh -c "touch $path" 2>/dev/null \
        || die "web could write $path"
done
log "web: read-only root and store (writing to /app, the store or the venv is refused)"

# The proxy's own error and the API's, both in the API's JSON shape.
head -c 11000000 /dev/zero > "$WORK/big.bin"
status=$(bounded 30 curl -s -m 20 -o "$WORK/responses/413.json" -D "$WORK/responses/413.head" \
    -w '%{http_code}' -H 'Content-Type: image/png' --data-binary "@$WORK/big.bin" "$URL/predict")
[[ $status == 413 && $(json "$WORK/responses/413.json" 'd["error"]["code"]') == payload_too_large ]] \
    && grep -qi '^server: nginx' "$WORK/responses/413.head" \
    || die "an 11 MB body through the proxy: $status $(cat "$WORK/responses/413.json")"
status=$(bounded 30 curl -s -m 10 -o "$WORK/responses/404.json" -w '%{http_code}' "$URL/models/other")
[[ $status == 404 && $(json "$WORK/responses/404.json" 'd["error"]["code"]') == model_not_found ]] \
    || die "GET /models/other through the proxy: $status $(cat "$WORK/responses/404.json")"
log "proxy: its own 413 and the API's 404, both as the API's JSON errors"

# Real digits: PNGs cut from the MNIST test set inside the serving image (Pillow
# and numpy are there), spread over the whole set.
log "cutting $N_DIGITS test digits from $MNIST"
bounded 120 podman run --rm --network none --no-healthcheck --user 0 --entrypoint python \
    -v "$MNIST:/mnist:ro" -v "$WORK/digits:/out" "$SERVE_TAG" -c '
import gzip, os, sys
import numpy as np
from PIL import Image
def read(stem):
    for p in ("/mnist/" + stem, "/mnist/" + stem + ".gz"):
        if os.path.exists(p):
            raw = open(p, "rb").read()
            return gzip.decompress(raw) if p.endswith(".gz") else raw
    sys.exit("no " + stem)
images = np.frombuffer(read("t10k-images-idx3-ubyte"), np.uint8, offset=16).reshape(-1, 28, 28)
labels = np.frombuffer(read("t10k-labels-idx1-ubyte"), np.uint8, offset=8)
n = int(sys.argv[1])
for k, i in enumerate(np.linspace(0, len(labels) - 1, n).astype(int)):
    Image.fromarray(images[i]).save(f"/out/{k:03d}-label{labels[i]}.png")
' "$N_DIGITS" || die "could not cut the test digits"

# post_digits VERSION MIN_ACCURACY: each PNG to /predict as multipart field "image".
post_digits() {
    local want_version=$1 min=$2 right=0 total=0 f label got version
    for f in "$WORK"/digits/*.png; do
        label=${f##*-label}; label=${label%.png}
        bounded 30 curl -sS -m 20 --fail-with-body -F "image=@$f;type=image/png" \
            "$URL/predict" -o "$WORK/responses/predict.json" \
            || die "POST /predict failed: $(cat "$WORK/responses/predict.json" 2>/dev/null)"
        got=$(json "$WORK/responses/predict.json" 'd["digit"]')
        version=$(json "$WORK/responses/predict.json" 'd["model"]["version"]')
        [[ $version == "$want_version" ]] || die "/predict answered with v$version, expected v$want_version"
        total=$((total + 1))
        [[ $got == "$label" ]] && right=$((right + 1))
    done
    log "v$want_version: $right of $total test digits right"
    python3 -c "import sys; sys.exit(not $right / $total >= $min)" \
        || die "v$want_version got $right of $total right; at least $min expected"
}

v1=$(metadata_version) || die "/metadata failed"
post_digits "$v1" "$MIN_ACCURACY"

# ---- 5. retraining and hot swap ------------------------------------------------------
# First a retrain held to a floor it cannot reach: it must publish nothing (exit 3).
log "retraining under --min-accuracy 0.999 (must be refused)"
set +e
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
bounded 900 docker-compose --profile train run --rm -T trainer $TRAIN_ARGS --no-progress \
    --min-accuracy 0.999 > "$WORK/logs/train-gated.log" 2>&1 < /dev/null
gated=$?
set -e
((gated == 3)) && grep -q 'nothing was published' "$WORK/logs/train-gated.log" \
    || { tail -n 30 "$WORK/logs/train-gated.log"; die "the gated retrain exited $gated, expected 3"; }
[[ $(metadata_version || true) == "$v1" ]] || die "a refused retrain changed the served version"
log "refused: $(grep -h 'is below' "$WORK/logs/train-gated.log" | sed 's/^error: //')"

want=$((v1 + 1))
log "retraining: docker-compose --profile train run --rm trainer $TRAIN_ARGS"
t0=$SECONDS
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
bounded 900 docker-compose --profile train run --rm -T trainer $TRAIN_ARGS --no-progress \
    --min-accuracy "$RETRAIN_MIN_ACCURACY" > "$WORK/logs/train.log" 2>&1 < /dev/null \
    || { tail -n 30 "$WORK/logs/train.log"; die "the trainer failed"; }
log "trainer done in $((SECONDS - t0)) s: $(grep -h '^published' "$WORK/logs/train.log" || true)"
grep -q "^published mnist v$want " "$WORK/logs/train.log" \
    || { tail -n 10 "$WORK/logs/train.log"; die "the trainer did not publish v$want"; }
# Each worker swaps on its own poll: wait for 8 answers in a row from the new version.
deadline=$((SECONDS + 90)) streak=0
while ((streak < 8)); do
    ((SECONDS < deadline)) || die "web still serves v$(metadata_version || echo '?') 90 s after v$want was published"
    if [[ $(metadata_version || true) == "$want" ]]; then streak=$((streak + 1)); else streak=0; sleep 1; fi
done
log "web serves v$want (hot swap)"
post_digits "$want" 0.8  # 16 of 20; the trainer held it to its floor on the whole test set
[[ $(podman inspect --format '{{.State.StartedAt}} restarts={{.RestartCount}}' "$WEB_ID") == "$started_at" ]] \
    || die "web was restarted (expected a hot swap)"
[[ $(bounded 30 docker-compose ps -q web) == "$WEB_ID" ]] || die "web was recreated"
wait_healthy 30

# ---- graceful stop under load ----------------------------------------------------------
# 16 clients posting digits to web's own port, new connections each, until web is gone.
bounded 120 python3 "$ROOT/scripts/drain_probe.py" --url "$WEB_URL" --png-dir "$WORK/digits" \
    --concurrency 16 --seconds 90 --until-refused > "$WORK/logs/drain.json" 2>&1 &
PROBE_PID=$!
sleep 3
t0=$SECONDS
bounded 90 docker-compose stop -t 45 web > "$WORK/logs/stop.log" 2>&1 || die "docker-compose stop failed"
stop_s=$((SECONDS - t0))
wait "$PROBE_PID" || die "the drain probe failed: $(cat "$WORK/logs/drain.json")"
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$WEB_ID")
podman logs "$WEB_ID" 2>&1 | grep -q 'Shutting down: Master' \
    || die "gunicorn did not shut down gracefully (exit $exit_code)"
((exit_code == 0)) || die "web exited with $exit_code on SIGTERM"
drain=$WORK/logs/drain.json
[[ $(json "$drain" 'd.get("lost", 0)') == 0 ]] \
    || die "docker stop of web lost requests it had received: $(cat "$drain")"
[[ $(json "$drain" 'sorted(set(d) - {"HTTP 200", "not received"})') == "[]" ]] \
    || die "docker stop of web: unexpected answers $(cat "$drain")"
(($(json "$drain" 'd.get("HTTP 200", 0)') > 0)) || die "the drain probe got no answer: $(cat "$drain")"
log "web stopped gracefully under load in $stop_s s: $(cat "$drain") (received but unanswered: 0)"
digit=$(find "$WORK/digits" -name '*.png' | sort | head -n1)
status=$(bounded 30 curl -s -m 20 -o "$WORK/responses/502.json" -w '%{http_code}' \
    -F "image=@$digit;type=image/png" "$URL/predict")
# 502 if web's address refuses, 504 if it no longer answers at all (a stopped container's
# address on podman's network: nginx's connect times out).
code=$(json "$WORK/responses/502.json" 'd["error"]["code"]')
[[ ($status == 502 && $code == bad_gateway) || ($status == 504 && $code == gateway_timeout) ]] \
    || die "the proxy with web stopped: $status $(cat "$WORK/responses/502.json")"
log "proxy with web stopped: a JSON $status $code"

bounded 120 docker-compose --profile train down -v -t 10 > "$WORK/logs/down.log" 2>&1 \
    || { cat "$WORK/logs/down.log"; die "docker-compose down failed"; }
COMPOSE_UP=
