#!/usr/bin/env bash
# Builds trainvisor's runtime base image without any container registry: a minimal Debian
# root file system made by debootstrap from Debian's packages (variant minbase, plus python3 for
# Python workers, tini as PID 1 and the CA certificates for S3 over TLS), imported with
# `docker import`. The Dockerfile then builds on it:
#
#   deploy/base-image.sh                               # -> trainvisor-base:bookworm
#   docker build -f deploy/Dockerfile --build-arg RUNTIME_IMAGE=trainvisor-base:bookworm ...
#
# Air-gapped hosts: point DEBIAN_MIRROR at a local mirror (apt-mirror, aptly, a USB copy of
# the archive: any `file:` or `http:` URL debootstrap accepts). DEBOOTSTRAP_CACHE keeps the
# downloaded .debs, so a second build needs no network at all.
#
# Idempotent and cached: if the image exists and was built from the same recipe (a label holds
# a hash of it), nothing is done. Concurrent runs (parallel tests, several worktrees on one
# engine) wait for each other on a lock file. Prints the image name on stdout.
#
# Environment: BASE_IMAGE (default trainvisor-base:bookworm), DEBIAN_SUITE (bookworm),
# DEBIAN_MIRROR (http://deb.debian.org/debian), DEBOOTSTRAP_CACHE (optional directory).
# Needs root (debootstrap) or sudo, debootstrap, and access to the Docker engine.
set -euo pipefail

suite="${DEBIAN_SUITE:-bookworm}"
image="${BASE_IMAGE:-trainvisor-base:$suite}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="python3-minimal,libpython3-stdlib,tini,ca-certificates"

# The recipe: what goes into the image. Changing it rebuilds the image.
recipe="suite=$suite variant=minbase packages=$packages prune=v1"
recipe_hash="$(printf '%s' "$recipe" | sha256sum | cut -c1-16)"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

current_hash() {
  docker image inspect --format '{{ index .Config.Labels "org.trainvisor.base.recipe" }}' \
    "$image" 2>/dev/null || true
}

exec 9>"${TMPDIR:-/tmp}/trainvisor-base-image.lock"
flock 9
if [ "$(current_hash)" = "$recipe_hash" ]; then
  echo "$image"
  exit 0
fi

command -v debootstrap >/dev/null 2>&1 || {
  echo "base-image.sh: debootstrap is missing (apt-get install debootstrap)" >&2
  exit 1
}

work="$(mktemp -d "${TMPDIR:-/tmp}/trainvisor-rootfs.XXXXXX")"
cleanup() { $SUDO rm -rf "$work"; }
trap cleanup EXIT
rootfs="$work/rootfs"

cache_args=()
if [ -n "${DEBOOTSTRAP_CACHE:-}" ]; then
  mkdir -p "$DEBOOTSTRAP_CACHE"
  cache_args=(--cache-dir="$(realpath "$DEBOOTSTRAP_CACHE")")
fi

echo "base-image.sh: debootstrap $suite (minbase + $packages) from $mirror" >&2
$SUDO debootstrap --variant=minbase --include="$packages" "${cache_args[@]}" \
  "$suite" "$rootfs" "$mirror" >&2

# What an image does not need: package caches and lists, documentation, man pages, locales
# other than the C one, and the debootstrap logs. apt and dpkg stay, so images built on this
# base can still `apt-get install` from a mirror.
$SUDO rm -rf \
  "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/debootstrap \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/lintian "$rootfs"/usr/share/linda \
  "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old
# Python byte-code caches are rebuilt on demand.
$SUDO find "$rootfs/usr/lib" -name __pycache__ -type d -prune -exec rm -rf {} +
# The apt sources the image uses: the same mirror (users may override in derived images).
echo "deb $mirror $suite main" | $SUDO tee "$rootfs/etc/apt/sources.list" >/dev/null

echo "base-image.sh: importing $image" >&2
$SUDO tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL org.trainvisor.base.recipe=$recipe_hash" \
  --change "LABEL org.opencontainers.image.description=\"Debian $suite minbase with python3, tini and ca-certificates, built by debootstrap\"" \
  --change 'CMD ["/bin/bash"]' \
  - "$image" >&2
echo "$image"
