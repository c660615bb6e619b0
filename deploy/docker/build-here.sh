#!/usr/bin/env bash
# Build the image with Debian's podman on a machine like this project's (root in a VM, no container registry
# reachable, TLS inspected, hybrid cgroups), then run it the way the Deployment does (read-only root,
# writable /tmp and STEMME_HOME, non-root) and check it answers /readyz. Prints the times.
#   deploy/docker/build-here.sh            build, then the smoke test
#   deploy/docker/build-here.sh --smoke    the smoke test of an image already built
# Not part of CI: the build downloads about 2 GB of wheels and takes tens of minutes (docs/deployment.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${STEMME_BUILD_WORK:-/var/tmp/stemme-build}
STORE=(--root "${STORAGE_ROOT:-$WORK/storage}" --storage-driver "${STORAGE_DRIVER:-overlay}")
IMAGE=${IMAGE:-localhost/stemme:0.1.0}
mkdir -p "$WORK"
# podman's default ulimits exceed what this sandbox grants (no CAP_SYS_RESOURCE: "setrlimit RLIMIT_NOFILE:
# Operation not permitted"), and crun refuses hybrid cgroups: no default ulimits, runc as the runtime
printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' > "$WORK/containers.conf"
export CONTAINERS_CONF="$WORK/containers.conf"

install_tools() {
  local missing=()
  for pkg in podman runc debootstrap; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
}

base_image() {
  # no container registry is reachable: the Dockerfile's base image is made from Debian's packages
  if ! podman "${STORE[@]}" image exists docker.io/library/debian:bookworm-slim; then
    local t=$SECONDS
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >/dev/null
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman "${STORE[@]}" import - docker.io/library/debian:bookworm-slim >/dev/null
    echo "base image from debootstrap: $((SECONDS - t)) s"
  fi
}

build() {
  local t=$SECONDS ctx=()
  # the CPU torch wheel, where this machine keeps one; pip's CA bundle, for a network that inspects TLS
  [ -d /opt/wheels ] && ctx=(--build-context wheels=/opt/wheels)
  podman "${STORE[@]}" build --format docker --network host "${ctx[@]}" \
    --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -20 "$WORK/build.log"; exit 1; }
  echo "build: $((SECONDS - t)) s; image: $(podman "${STORE[@]}" image inspect "$IMAGE" --format '{{.Size}}') bytes"
}

smoke() {
  local port=${PORT:-18000} name=stemme-smoke t=$SECONDS
  podman "${STORE[@]}" rm -f "$name" >/dev/null 2>&1 || true
  podman "${STORE[@]}" run -d --name "$name" --network host --read-only --tmpfs /tmp \
    --mount type=tmpfs,destination=/var/lib/stemme,tmpfs-mode=0700,chown=true \
    --cap-drop ALL --security-opt no-new-privileges -e STEMME_PORT="$port" -e STEMME_ASR_THREADS=2 \
    -e STEMME_LLM_THREADS=2 -e STEMME_TTS_THREADS=2 "$IMAGE" stemme serve --host 127.0.0.1 --port "$port" >/dev/null
  until curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
    if [ $((SECONDS - t)) -gt 600 ] || ! podman "${STORE[@]}" container exists "$name"; then
      podman "${STORE[@]}" logs "$name" 2>&1 | tail -30; exit 1
    fi
    sleep 2
  done
  echo "container ready (/readyz 200) after $((SECONDS - t)) s"
  echo "user in the container: $(podman "${STORE[@]}" exec "$name" id -u)"
  podman "${STORE[@]}" exec "$name" stemme voices | grep -c '\*' | xargs echo "languages with a default voice:"
  podman "${STORE[@]}" healthcheck run "$name" && echo "HEALTHCHECK: healthy"
  # a voice turn from the host's client: a French recording in, a spoken answer out
  if [ -x .venv/bin/stemme ]; then
    .venv/bin/stemme talk --url "ws://127.0.0.1:$port" --out "$WORK/replies" \
      tests/data/speech/fr/asterisk_conf-onlyperson.wav | tail -1
  fi
  t=$SECONDS
  podman "${STORE[@]}" stop -t 60 "$name" >/dev/null
  echo "stopped (SIGTERM) in $((SECONDS - t)) s, exit code $(podman "${STORE[@]}" inspect "$name" --format '{{.State.ExitCode}}')"
  podman "${STORE[@]}" logs "$name" 2>&1 | grep -i "verified\|error\|Traceback" | head -5
  podman "${STORE[@]}" rm "$name" >/dev/null
}

install_tools
if [ "${1:-}" != "--smoke" ]; then
  base_image
  build
fi
smoke
