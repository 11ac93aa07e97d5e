#!/usr/bin/env bash
# Build the operator and trainer images on this machine, without a Docker engine or a registry.
# podman (with runc) builds operator/Dockerfile and trainer_image/Dockerfile unchanged, only with
# --build-arg PYTHON_IMAGE=<a local base>: Debian bookworm's python3, made from Debian packages with
# mmdebstrap. The images are tagged as the Helm chart and the renderer expect and saved as
# docker-archive tars (load them with `ctr -n k8s.io images import TAR`, `docker load -i TAR` or
# `podman load -i TAR`).
#
#   bash scripts/build-images.sh [base|operator|trainer|all]          # default: all
#   bash scripts/build-images.sh --list [base|operator|trainer|all]   # refs and tar paths; builds nothing
#
# Logs go to stderr. The last stdout lines are one "<image ref> <tar path>" per image (for `base`:
# the base image and its root filesystem tar). An image whose inputs (its Dockerfile, pyproject.toml,
# README.md, constraints.txt, .dockerignore, the package sources, the base) did not change since it
# was last built is reused in seconds; a changed source rebuilds only the small top layers.
# Missing host tools (podman, runc, mmdebstrap, ...) are installed by scripts/host-tools.sh (apt-get, as root).
#
# Where things live: ${SFT_CACHE:-~/.cache/sft-operator}/images (base rootfs, image tars, stamps),
# podman's own store (layers; `podman images` lists them with CONTAINERS_CONF=scripts/containers.conf),
# /var/tmp/buildah-cache (pip's download cache, shared by the builds). The project's podman settings
# are in scripts/containers.conf; nothing under /etc is changed.
set -Eeuo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}/images
export CONTAINERS_CONF=$ROOT/scripts/containers.conf
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)
# The refs the chart (values.yaml image.repository + Chart.yaml appVersion, trainer.image) and the
# renderer (RenderOptions.default_image) use; tests/unit/test_build_images.py keeps them in step.
OPERATOR_REF=ghcr.io/sft-operator/operator:$VERSION
TRAINER_REF=ghcr.io/sft-operator/trainer:$VERSION

# The base: what python:3.11-slim-bookworm offers the Dockerfiles (python, venv, groupadd/useradd,
# CA certificates), from Debian's own packages. Docs and man pages are left out as in Debian's
# slim images; copyright files stay.
MIRROR=${SFT_DEBIAN_MIRROR:-http://deb.debian.org}
BASE_ARGS=(
  --variant=minbase --format=tar
  --include=python3,python3-venv,python-is-python3,passwd,ca-certificates
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  bookworm
)
BASE_SOURCES=("deb $MIRROR/debian bookworm main" "deb $MIRROR/debian bookworm-updates main"
              "deb $MIRROR/debian-security bookworm-security main")
BASE_KEY=$(printf '%s\n' "${BASE_ARGS[@]}" | sha256sum | cut -c1-12)
BASE_TAR=$CACHE/base-bookworm-$BASE_KEY.tar
BASE_REF=localhost/sft-operator/python-base:bookworm-$BASE_KEY

log() { echo "[images $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
trap 'rc=$?; log "error: \"$BASH_COMMAND\" failed (exit $rc)"; exit $rc' ERR

usage() {
  sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

list=0
target=all
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --list) list=1 ;;
    base|operator|trainer|all) target=$arg ;;
    *) die "unknown argument: $arg (usage: bash scripts/build-images.sh [--list] [base|operator|trainer|all]; --help)" ;;
  esac
done

tar_of() { echo "$CACHE/$1-$VERSION.tar"; }
ref_of() { case $1 in operator) echo "$OPERATOR_REF" ;; trainer) echo "$TRAINER_REF" ;; esac; }
dockerfile_of() { case $1 in operator) echo operator/Dockerfile ;; trainer) echo trainer_image/Dockerfile ;; esac; }
case $target in
  all) images=(operator trainer) ;;
  base) images=() ;;
  *) images=("$target") ;;
esac

if [[ $list == 1 ]]; then
  [[ $target == base ]] && echo "$BASE_REF $BASE_TAR"
  for name in "${images[@]}"; do echo "$(ref_of "$name") $(tar_of "$name")"; done
  exit 0
fi

ensure_tools() {
  bash "$ROOT/scripts/host-tools.sh" || die "host tools missing (see above); scripts/host-tools.sh lists them"
}

image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

ensure_base() {
  if [[ ! -s $BASE_TAR ]]; then
    log "base: Debian bookworm root filesystem with python3 from $MIRROR (mmdebstrap, about a minute)"
    local t0=$SECONDS
    rm -f "$BASE_TAR.part"
    nice -n 10 mmdebstrap --quiet "${BASE_ARGS[@]}" "$BASE_TAR.part" "${BASE_SOURCES[@]}" >&2
    sha256sum "$BASE_TAR.part" | cut -c1-64 >"$BASE_TAR.sha256"
    rm -f "$BASE_TAR.image-id"
    mv "$BASE_TAR.part" "$BASE_TAR"
    log "base: $BASE_TAR ($(du -h "$BASE_TAR" | cut -f1)) in $((SECONDS - t0)) s"
  fi
  [[ -s $BASE_TAR.sha256 ]] || sha256sum "$BASE_TAR" | cut -c1-64 >"$BASE_TAR.sha256"
  # The image imported from this very tar (a new tar, e.g. for newer Debian packages, is imported again).
  if [[ -s $BASE_TAR.image-id && $(image_id "$BASE_REF") == "$(cat "$BASE_TAR.image-id")" ]]; then
    log "base: $BASE_REF (cached)"
  else
    # PATH must be set: the Dockerfiles extend it (ENV PATH=/opt/sft/bin:$PATH).
    podman import --quiet \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
      "$BASE_TAR" "$BASE_REF" >/dev/null
    image_id "$BASE_REF" >"$BASE_TAR.image-id"
    log "base: imported $BASE_REF"
  fi
}

# Everything an image is built from. The find mirrors .dockerignore (no bytecode).
inputs_hash() {
  (
    cd "$ROOT"
    {
      printf '%s\n' "$1" pyproject.toml README.md trainer_image/constraints.txt .dockerignore
      find contract/sft_contract operator/sft_operator trainer_image/sft_trainer -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort
    } | xargs -d '\n' sha256sum
    echo "base $(cat "$BASE_TAR.sha256")"
  ) | sha256sum | cut -c1-64
}

build_image() {
  local name=$1 ref tar dockerfile stamp hash stamped_hash="" stamped_id="" t0 id
  ref=$(ref_of "$name") tar=$(tar_of "$name") dockerfile=$(dockerfile_of "$name") stamp=$CACHE/$name-$VERSION.stamp
  hash=$(inputs_hash "$dockerfile")
  [[ -f $stamp ]] && read -r stamped_hash stamped_id <"$stamp"
  if [[ -s $tar && $stamped_hash == "$hash" ]]; then
    if [[ $(image_id "$ref") != "$stamped_id" ]]; then
      log "$name: inputs unchanged; loading $tar into podman"
      podman load --quiet --input "$tar" >&2
      echo "$hash $(image_id "$ref")" >"$stamp"
    fi
    log "$name: $ref up to date ($tar)"
    return
  fi
  log "$name: building $ref from $dockerfile on $BASE_REF"
  t0=$SECONDS
  local trust=()
  # The build's pip talks to PyPI; if this machine trusts extra CAs (a TLS-inspecting proxy), RUN
  # steps see the host's bundle at the path Debian's pip reads. A build-time mount: not in the image.
  [[ -s /etc/ssl/certs/ca-certificates.crt ]] &&
    trust=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  nice -n 10 podman build --pull=never --layers --network=host "${trust[@]}" \
    --build-arg PYTHON_IMAGE="$BASE_REF" --file "$ROOT/$dockerfile" --tag "$ref" "$ROOT" >&2
  id=$(image_id "$ref")
  if [[ -s $tar && $id == "$stamped_id" ]]; then  # e.g. only a Dockerfile comment changed
    log "$name: built in $((SECONDS - t0)) s; same image as $tar"
  else
    log "$name: built in $((SECONDS - t0)) s; saving $tar"
    # The old tar goes first: a trainer tar is GiBs, and two copies may not fit.
    rm -f "$stamp" "$tar" "$tar.part"
    podman save --format docker-archive --output "$tar.part" "$ref" >&2
    mv "$tar.part" "$tar"
  fi
  echo "$hash $id" >"$stamp"
  # Earlier builds of this image that nothing uses any more (an old dependency layer is GiBs);
  # the label keeps other projects' images out of it, and the current build's cache stays.
  local title pruned
  title=$(podman image inspect --format '{{index .Labels "org.opencontainers.image.title"}}' "$ref")
  pruned=$(podman image prune --force --filter "label=org.opencontainers.image.title=$title" | wc -l)
  [[ $pruned == 0 ]] || log "$name: removed $pruned unused earlier build steps of $title"
  log "$name: $ref ($(podman image inspect --format '{{.Size}}' "$ref" | numfmt --to=iec) image, $(du -h "$tar" | cut -f1) tar) in $((SECONDS - t0)) s"
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock -n 9 || { log "waiting for another build-images.sh"; flock 9; }
ensure_tools
ensure_base
for name in "${images[@]}"; do build_image "$name"; done

[[ $target == base ]] && echo "$BASE_REF $BASE_TAR"
for name in "${images[@]}"; do echo "$(ref_of "$name") $(tar_of "$name")"; done
