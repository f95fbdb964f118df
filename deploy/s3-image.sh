#!/usr/bin/env bash
# Builds an S3 server image without any container registry, for deploy/compose.yaml on a
# machine that cannot pull MinIO: s3s-fs (a Rust S3 server over a directory, from crates.io)
# on trainvisor's registry-free base (deploy/base-image.sh, which this runs first). The tests
# build their S3 image with this script.
#
#   S3_IMAGE=$(deploy/s3-image.sh) docker compose -f deploy/compose.yaml up -d
#
# It serves the directory /data (a volume; a bucket is a directory) on port 9000. Its
# entrypoint takes the credentials from S3_ACCESS_KEY / S3_SECRET_KEY, or MinIO's
# MINIO_ROOT_USER / MINIO_ROOT_PASSWORD, and ignores its arguments (MinIO's, from
# compose.yaml or a manifest), so it stands in for MinIO unchanged. /data is writable by any
# user, as a volume is for a pod's fsGroup (the StatefulSet runs it as a non-root user).
#
# The s3s-fs binary: S3S_FS if set, else s3s-fs on the PATH or in ~/.cargo/bin, else installed
# with `cargo install s3s-fs --version 0.14.1 --features binary --locked` (~2 min, crates.io).
# Cached: the tag is a digest of the binary, the recipe and the base, and an image of that tag
# is not built again. Prints the image name on stdout (S3_IMAGE_REPO, default trainvisor-s3s).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="${S3_IMAGE_REPO:-trainvisor-s3s}"
base="$("$here/base-image.sh")"

binary="${S3S_FS:-}"
if [ -z "$binary" ]; then
  binary="$(command -v s3s-fs || true)"
fi
if [ -z "$binary" ] && [ -x "$HOME/.cargo/bin/s3s-fs" ]; then
  binary="$HOME/.cargo/bin/s3s-fs"
fi
if [ -z "$binary" ]; then
  echo "s3-image.sh: installing s3s-fs from crates.io (cargo install)" >&2
  cargo install s3s-fs --version 0.14.1 --features binary --locked >&2
  binary="$HOME/.cargo/bin/s3s-fs"
fi

ctx="$(mktemp -d "${TMPDIR:-/tmp}/trainvisor-s3-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
cp "$binary" "$ctx/s3s-fs"
cat >"$ctx/entrypoint.sh" <<'SH'
#!/bin/sh
# Arguments (MinIO's, from compose.yaml or a manifest) are ignored.
exec s3s-fs --host 0.0.0.0 --port 9000 \
  --access-key "${S3_ACCESS_KEY:-$MINIO_ROOT_USER}" \
  --secret-key "${S3_SECRET_KEY:-$MINIO_ROOT_PASSWORD}" /data
SH
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $base
COPY s3s-fs entrypoint.sh /usr/local/bin/
RUN chmod 0755 /usr/local/bin/entrypoint.sh && mkdir -m 0777 /data
VOLUME /data
EXPOSE 9000
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
DOCKERFILE

base_id="$(docker image inspect -f '{{.Id}}' "$base")"
digest="$(cat "$ctx/s3s-fs" "$ctx/entrypoint.sh" "$ctx/Dockerfile" <(printf '%s' "$base_id") \
  | sha256sum | cut -c1-16)"
image="$repo:$digest"
if ! docker image inspect "$image" >/dev/null 2>&1; then
  docker build -q --label org.trainvisor.s3-image=1 -t "$image" "$ctx" >&2
fi
echo "$image"
