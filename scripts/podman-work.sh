# shellcheck shell=bash
# A private rootful podman for one test run: its own configuration, storage and
# network settings in a work folder, and everything removed afterwards. Sourced by
# scripts/kube-e2e.sh; the caller defines log, die and bounded (see there) and runs
# as root. See shared notes on this machine: runc with cgroupfs, file events and
# lowered ulimits are what podman needs here (no systemd).
#
#   podman_clean_stale PREFIX   remove work folders of killed runs (/tmp/PREFIX.*)
#   podman_make_work PREFIX     make $WORK, write the configuration, export it
#   podman_reset_work           remove every container, volume, network, image and
#                               the storage of $WORK, then $WORK itself
#   podman_images BASE SERVE TRAIN  the local base image, then the serve and train
#                               targets of the Dockerfile
#   podman_proxy_image BASE PROXY   deploy/nginx's image (after podman_images)

# podman_clean_stale PREFIX: a run killed outright (SIGKILL, a machine restart) could
# not clean up; its folder holds gigabytes of storage, some of it still mounted.
# Remove those whose run is gone (no live pid; without a pid file: over an hour old).
podman_clean_stale() {
    local stale
    for stale in "/tmp/$1".*; do
        [[ -d $stale ]] || continue
        if [[ -f $stale/pid ]]; then
            kill -0 "$(cat "$stale/pid")" 2>/dev/null && continue
        elif [[ -z $(find "$stale" -maxdepth 0 -mmin +60) ]]; then
            continue
        fi
        log "removing $stale, left by a run that was killed"
        # Its containers' processes may still run (a killed run's pods): stop them.
        if [[ -f $stale/containers.conf && -f $stale/storage.conf ]]; then
            CONTAINERS_CONF=$stale/containers.conf CONTAINERS_STORAGE_CONF=$stale/storage.conf \
                bounded 120 podman rm -a -f -t 2 >/dev/null 2>&1 || true
            CONTAINERS_CONF=$stale/containers.conf CONTAINERS_STORAGE_CONF=$stale/storage.conf \
                bounded 120 podman pod rm -a -f >/dev/null 2>&1 || true
        fi
        awk -v dir="$stale/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r \
            | xargs -r -n1 umount -l
        rm -rf "$stale"
    done
}

# podman_make_work PREFIX: $WORK (short: podman's socket paths must fit 108 bytes).
podman_make_work() {
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    echo $$ > "$WORK/pid"
    mkdir -p "$WORK/logs"
    cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/events.log"
tmp_dir = "$WORK/libpod"
[network]
network_config_dir = "$WORK/networks"
EOF
    cat > "$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf
    # podman's lock segment is shared by every rootful podman here: remove it only if
    # this run made it.
    SHM_LOCK_PREEXISTED=
    [[ -e /dev/shm/libpod_lock ]] && SHM_LOCK_PREEXISTED=1
    return 0
}

podman_reset_work() {
    [[ -n ${WORK:-} && -d $WORK ]] || return 0
    bounded 60 podman pod rm -a -f -t 3 >/dev/null 2>&1
    bounded 60 podman rm -a -f -t 3 >/dev/null 2>&1
    bounded 60 podman volume rm -a -f >/dev/null 2>&1
    bounded 60 podman network prune -f >/dev/null 2>&1
    bounded 120 podman system reset -f >/dev/null 2>&1
    # Whatever is still mounted under the work folder (storage), innermost first.
    awk -v w="$WORK" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r \
        | while read -r m; do umount -l "$m"; done
    rm -rf "$WORK"
    [[ -n $SHM_LOCK_PREEXISTED ]] || rm -f /dev/shm/libpod_lock
    return 0
}

# podman_images BASE_TAG SERVE_TAG TRAIN_TAG: a cached debootstrap base (no registry
# here; scripts/make-base-image.sh), then the Dockerfile's serve and train targets.
podman_images() {
    local base=$1 root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    bounded 1200 "$root/scripts/make-base-image.sh" "$base" > "$WORK/logs/base.log" 2>&1 \
        || { tail -n 40 "$WORK/logs/base.log"; die "could not make the base image"; }
    grep '^\[make-base-image\]' "$WORK/logs/base.log" | sed 's/^/    /'
    _podman_build "$root" "$base" serve "$2"
    _podman_build "$root" "$base" train "$3"
}

# podman_proxy_image BASE_TAG PROXY_TAG: deploy/nginx's image, nginx in front of web.
podman_proxy_image() {
    local root t0=$SECONDS
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    bounded 1200 podman build --format docker --build-arg "BASE_IMAGE=$1" -t "$2" \
        "$root/deploy/nginx" > "$WORK/logs/build-proxy.log" 2>&1 \
        || { tail -n 40 "$WORK/logs/build-proxy.log"; die "building deploy/nginx failed"; }
    log "built $2 (deploy/nginx) in $((SECONDS - t0)) s:" \
        "$(podman image inspect --format '{{.Size}}' "$2" | awk '{printf "%.0f MB", $1/1e6}')"
}

_podman_build() {
    local root=$1 base=$2 target=$3 tag=$4 t0=$SECONDS
    bounded 1200 podman build --format docker --build-arg "BASE_IMAGE=$base" \
        --target "$target" -t "$tag" "$root" > "$WORK/logs/build-$target.log" 2>&1 \
        || { tail -n 40 "$WORK/logs/build-$target.log"; die "building target $target failed"; }
    log "built $tag (target $target) in $((SECONDS - t0)) s:" \
        "$(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
}
