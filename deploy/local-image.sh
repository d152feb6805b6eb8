#!/usr/bin/env bash
# Build and run the real Dockerfile on this machine with podman: no Docker engine, no registry.
#
#   deploy/local-image.sh base          the local base image (Debian bookworm's python3 + venv,
#                                       made with mmdebstrap), unless it exists
#   deploy/local-image.sh wheelhouse    wheels for requirements.txt, downloaded on the host
#   deploy/local-image.sh build         base + wheelhouse + `podman build` of ./Dockerfile
#   deploy/local-image.sh run ROLE …    `podman run` of the image with the options below
#   deploy/local-image.sh name          print the image's name
#
# Each finding of running podman on machines of this kind is an option, not an assumption:
#   RUNTIME=runc        OCI runtime (crun can fail on hosts with hybrid cgroups; runc works)
#   NOFILE=, NPROC=     container limits (default: this shell's hard nofile limit, and 4096
#                       processes; hosts of this kind refuse a container whose limits exceed
#                       what they allow, and here an nproc of 65536 or more was refused even
#                       below the shell's hard limit)
#   WHEELHOUSE=var/wheelhouse   pip inside the build installs from these wheels with no network
#                       (downloaded beforehand on the host's network, trusting HOST_CA, by the
#                       base's own pip); WHEELHOUSE= (empty) lets pip in the build reach its index
#   HOST_CA=/etc/ssl/certs/ca-certificates.crt   the CA bundle the wheelhouse download trusts
#   EXTRA_CA=path.pem   a TLS-intercepting proxy's CA, added to the LOCAL BASE only (never to the
#                       Dockerfile); needed only when the build itself reaches the network
#   NO_CACHE=1          a cold build (no cached layers)
#   IMAGE=…             the image name (default localhost/emailops:<git sha>)
#   BASE_IMAGE=…        any base with Python 3.11 and venv (default the mmdebstrap one)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME="${RUNTIME:-runc}"
NOFILE="${NOFILE:-$(ulimit -Hn)}"
NPROC="${NPROC:-4096}"
[ "$NOFILE" = unlimited ] && NOFILE=1048576
WHEELHOUSE="${WHEELHOUSE-var/wheelhouse}"
SHA="$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then SHA="${SHA}-dirty"; fi
IMAGE="${IMAGE:-localhost/emailops:${SHA}}"
BASE_IMAGE="${BASE_IMAGE:-localhost/emailops-base:bookworm}"
HOST_CA="${HOST_CA-/etc/ssl/certs/ca-certificates.crt}"
LIMITS=(--ulimit "nofile=${NOFILE}:${NOFILE}" --ulimit "nproc=${NPROC}:${NPROC}")

log() { printf '%s local-image: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

base() {
  if podman image exists "$BASE_IMAGE"; then
    log "base $BASE_IMAGE exists"
    return
  fi
  case "$BASE_IMAGE" in
    localhost/*) ;;
    *) log "$BASE_IMAGE is not here and builds never pull (--pull=never): pull it first"; exit 1 ;;
  esac
  BASE_TMP="$(mktemp -d)"
  trap 'rm -rf "$BASE_TMP"' EXIT
  local tmp="$BASE_TMP"
  log "building $BASE_IMAGE with mmdebstrap (Debian bookworm: python3, python3-venv)"
  local hooks=()
  if [ -n "${EXTRA_CA:-}" ]; then
    cp "$EXTRA_CA" "$tmp/extra-ca.crt"
    hooks=(--customize-hook="copy-in $tmp/extra-ca.crt /usr/local/share/ca-certificates"
           --customize-hook='chroot "$1" update-ca-certificates')
  fi
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "${hooks[@]}" bookworm "$tmp/base.tar" >&2
  podman import --change 'CMD ["/usr/bin/python3"]' "$tmp/base.tar" "$BASE_IMAGE" >/dev/null
  log "base $BASE_IMAGE built"
}

wheelhouse() {
  [ -n "$WHEELHOUSE" ] || return 0
  mkdir -p "$WHEELHOUSE"
  # Downloaded by the base's own pip, so that environment markers are evaluated for the base's
  # Python (Debian's 3.11.2 needs async-timeout for redis; the host's newer 3.11 does not, and
  # `pip download --python-version` does not change that marker). It runs on the host's network
  # and trusts the host's CA bundle (HOST_CA), which may hold a TLS-intercepting proxy's CA:
  # that trust is used here only, never in the image.
  local ca=() cache
  cache="$(realpath -m "${PIP_CACHE:-var/pip-cache}")"
  mkdir -p "$cache"
  if [ -n "$HOST_CA" ] && [ -f "$HOST_CA" ]; then
    ca=(-v "$(realpath "$HOST_CA"):/etc/emailops-host-ca.pem:ro" -e PIP_CERT=/etc/emailops-host-ca.pem)
  fi
  # Skipped when it was last filled for these very requirements and this base.
  local stamp="$WHEELHOUSE/.filled-for" want
  want="$(sha256sum requirements.txt | cut -d' ' -f1) $(podman image inspect --format '{{.Id}}' "$BASE_IMAGE")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "wheelhouse $WHEELHOUSE is up to date"
    return 0
  fi
  log "wheelhouse $WHEELHOUSE for requirements.txt (pip of $BASE_IMAGE)"
  run --rm --network host "${ca[@]}" \
    -v "$(realpath requirements.txt):/src/requirements.txt:ro" \
    -v "$(realpath "$WHEELHOUSE"):/wheels" -v "$cache:/pip-cache" \
    --entrypoint sh "$BASE_IMAGE" -c '
      set -e
      python3 -m venv /tmp/pip
      get="/tmp/pip/bin/pip download --quiet --disable-pip-version-check --only-binary=:all:"
      get="$get -r /src/requirements.txt -d /wheels"
      # Nothing to fetch when the wheelhouse already holds every requirement.
      $get --no-index --find-links /wheels >/dev/null 2>&1 || $get --cache-dir /pip-cache' >&2
  echo "$want" >"$stamp"
}

build() {
  base
  wheelhouse
  local args=(--pull=never --runtime "$RUNTIME" "${LIMITS[@]}" --format docker
              --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" -f Dockerfile)
  if [ -n "$WHEELHOUSE" ]; then
    args+=(--network none --volume "$(realpath "$WHEELHOUSE"):/wheels:ro"
           --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels)
  fi
  [ -n "${NO_CACHE:-}" ] && args+=(--no-cache)
  log "podman build $IMAGE"
  podman build "${args[@]}" . >&2
  echo "$IMAGE"
}

run() {
  # Callers add --name, --network, -e … before the role; the rest goes to the entrypoint.
  podman run --runtime "$RUNTIME" --pull=never "${LIMITS[@]}" "$@"
}

case "${1:-}" in
  base) base ;;
  wheelhouse) wheelhouse ;;
  build) build ;;
  run) shift; run "$@" ;;
  name) echo "$IMAGE" ;;
  *) sed -n '2,28p' "$0" >&2; exit 2 ;;
esac
