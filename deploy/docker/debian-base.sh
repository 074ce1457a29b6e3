#!/usr/bin/env bash
# Builds a Debian base image from a Debian mirror with debootstrap, for a builder that cannot pull
# docker.io/library/debian (an air-gapped or registry-less machine). Runs as root. Idempotent: the
# root file system is cached as a tarball and the image is only imported when missing.
#
#   deploy/docker/debian-base.sh [IMAGE]        # default localhost/batonserve-base:bookworm
#   podman build -f deploy/docker/Dockerfile.cpu \
#     --build-arg BASE_IMAGE=localhost/batonserve-base:bookworm -t batonserve:0.1.0 .
#
# The root file system already holds the CPU image's OS packages, so building on it needs no
# Debian mirror. Environment: ENGINE (the `podman` or `docker` command with any global options;
# default podman), SUITE (bookworm: python3 is 3.11, which the torch wheels match),
# DEBIAN_MIRROR, INCLUDE (comma-separated packages), BASE_CACHE (folder of the cached tarball,
# default .tools/image).
set -euo pipefail

IMAGE=${1:-localhost/batonserve-base:bookworm}
ENGINE=${ENGINE:-podman}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
INCLUDE=${INCLUDE:-bash,ca-certificates,procps,python3,python3-venv,wget}
CACHE=${BASE_CACHE:-.tools/image}

mkdir -p "$CACHE"
# The package list is part of the name: a different INCLUDE makes a new tarball.
tag=$(printf '%s %s %s' "$SUITE" "$MIRROR" "$INCLUDE" | sha256sum | cut -c1-12)
tarball="$CACHE/debian-$SUITE-$tag.tar"
if [ ! -s "$tarball" ]; then
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$tarball.tmp"' EXIT
    # minbase: essential packages and apt, about what debian:bookworm-slim holds, plus INCLUDE.
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$MIRROR"
    # mktemp made the folder 0700; it becomes the image's "/", which every user must traverse.
    chmod 0755 "$rootfs"
    security_mirror="${MIRROR%/debian}/debian-security"
    {
        echo "deb $MIRROR $SUITE main"
        echo "deb $MIRROR $SUITE-updates main"
        echo "deb $security_mirror $SUITE-security main"
    } > "$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/bootstrap.log
    # Device nodes and kernel file systems are the runtime's business, not the image's.
    tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
fi

# The label ties the image to its tarball: a new INCLUDE re-imports under the same name.
label=io.batonserve.base-rootfs
have=$($ENGINE image inspect --format "{{ index .Config.Labels \"$label\" }}" "$IMAGE" 2>/dev/null || true)
if [ "$have" != "$tag" ]; then
    $ENGINE import --change 'CMD ["/bin/bash"]' --change "LABEL $label=$tag" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$tarball" "$IMAGE" >/dev/null
fi
echo "$IMAGE"
