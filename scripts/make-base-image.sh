#!/usr/bin/env bash
# Make a local Debian bookworm base image with Python 3.11, without a registry.
#
#   scripts/make-base-image.sh [TAG]        # default TAG: localhost/digitserve-bookworm-python:3.11
#
# It stands in for python:3.11-slim-bookworm when no registry can be reached:
# build with `--build-arg BASE_IMAGE=TAG`. Needs root, debootstrap and podman;
# podman's configuration and storage come from the caller's environment
# (CONTAINERS_CONF / CONTAINERS_STORAGE_CONF, as scripts/container-e2e.sh sets them).
#
# Two layers:
#   1. a debootstrap'd minbase rootfs with python3, python3-venv and ca-certificates,
#      cached as a tarball in $DIGITSERVE_E2E_CACHE (default ~/.cache/digitserve-e2e)
#      and reused while this script and its inputs are unchanged;
#   2. this machine's own settings, added at every import and never cached or
#      shipped: the host's CA bundle with an /etc/pip.conf that trusts it (HTTPS
#      here passes through a TLS-intercepting proxy) and the host's apt
#      Check-Valid-Until setting. The Dockerfile itself knows nothing of them.
#
# Environment: DIGITSERVE_E2E_CACHE, DEBIAN_MIRROR (default: the host's apt
# mirror, else http://deb.debian.org/debian), HOST_CA_BUNDLE (default
# /etc/ssl/certs/ca-certificates.crt; set it empty to add none).
set -euo pipefail

TAG=${1:-localhost/digitserve-bookworm-python:3.11}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
CACHE=${DIGITSERVE_E2E_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/digitserve-e2e}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}

log() { printf '[make-base-image] %s\n' "$*" >&2; }

host_mirror() {
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror)}
MIRROR=${MIRROR%/}
SECURITY_MIRROR=${MIRROR%/debian}/debian-security

# The cache key covers everything that goes into the rootfs.
KEY=$(printf '%s\n' "$SUITE" "$PACKAGES" "$MIRROR" "$(sed -n '/^# --- rootfs ---/,/^# --- end rootfs ---/p' "$0")" \
    | sha256sum | cut -c1-16)
TARBALL=$CACHE/rootfs-$SUITE-python-$KEY.tar

make_rootfs() {
    local root tmp
    mkdir -p "$CACHE"
    root=$(mktemp -d "$CACHE/.rootfs.XXXXXX")
    tmp=$TARBALL.part.$$
    # shellcheck disable=SC2064
    trap "rm -rf '$root' '$tmp'" EXIT
    log "debootstrap $SUITE ($PACKAGES) from $MIRROR (takes a minute or two)"
# --- rootfs ---
    timeout --foreground 900 debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" \
        > "$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; return 1; }
    rm -f "$root.log"
    cat > "$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    chroot "$root" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version'
    rm -rf "${root:?}"/var/cache/apt/archives/*.deb "${root:?}"/var/lib/apt/lists/* \
        "${root:?}"/var/log/*.log "${root:?}"/usr/share/man/* "${root:?}"/tmp/* "${root:?}"/dev/*
# --- end rootfs ---
    tar --numeric-owner -C "$root" -cf "$tmp" .
    mv "$tmp" "$TARBALL"
    rm -rf "$root"
    trap - EXIT
    # Older rootfs tarballs of this script are stale now.
    find "$CACHE" -maxdepth 1 -name "rootfs-$SUITE-python-*.tar" ! -name "${TARBALL##*/}" -delete
    log "cached $TARBALL ($(du -h "$TARBALL" | cut -f1))"
}

if [[ -s $TARBALL ]]; then
    log "using cached $TARBALL"
else
    make_rootfs
fi

log "importing as $TAG"
timeout --foreground 300 podman import --quiet \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$TARBALL" "$TAG-rootfs" >/dev/null

# Layer 2: this machine's settings, never in the cache or the Dockerfile.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
: > "$ctx/host-ca.pem"
if [[ -n $HOST_CA_BUNDLE && -s $HOST_CA_BUNDLE ]]; then
    cp "$HOST_CA_BUNDLE" "$ctx/host-ca.pem"
fi
printf '[global]\n' > "$ctx/pip.conf"
[[ -s $ctx/host-ca.pem ]] && printf 'cert = /usr/local/share/digitserve-host/ca.pem\n' >> "$ctx/pip.conf"
: > "$ctx/apt.conf"
if apt-config dump 2>/dev/null | grep -q '^Acquire::Check-Valid-Until "false";'; then
    printf 'Acquire::Check-Valid-Until "false";\n' > "$ctx/apt.conf"
fi
cat > "$ctx/Containerfile" <<EOF
FROM $TAG-rootfs
COPY host-ca.pem /usr/local/share/digitserve-host/ca.pem
COPY pip.conf /etc/pip.conf
COPY apt.conf /etc/apt/apt.conf.d/99digitserve-host
EOF
timeout --foreground 300 podman build --quiet --network none -t "$TAG" -f "$ctx/Containerfile" "$ctx" >/dev/null
podman rmi "$TAG-rootfs" >/dev/null 2>&1 || true
log "ready: $TAG"
echo "$TAG"
