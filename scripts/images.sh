#!/usr/bin/env bash
# Builds Framelane's images with Docker from this checkout:
#   OPERATOR_IMAGE      framelane-operator: a static (musl) binary on an empty image
#   RUNNER_IMAGE        framelane-runner with libtorch and its CUDA libraries (GPU lanes)
#   RUNNER_IMAGE-cpu    the same layout without the CUDA libraries (lanes without GPUs)
# cargo compiles the binaries here (release), and each image's build context is a folder
# under target/images/ that holds exactly what the image gets, hard-linked from target/ and
# from the torch wheel that gpu-runner/scripts/setup-torch.sh installs. No registry is needed:
# the runner's base (BASE_IMAGE, default debian:bookworm-slim) is used when Docker has it or
# can pull it, else made from Debian packages with mmdebstrap (cached outside the checkout).
# As root, what is missing (docker.io, musl-tools, mmdebstrap, the musl Rust target) is
# installed, and a Docker engine is started when none answers.
#
#   scripts/images.sh OPERATOR_IMAGE RUNNER_IMAGE [cuda|cpu]...   (default: both flavours)
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${FRAMELANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/framelane}
MUSL=x86_64-unknown-linux-musl
LABEL=dev.framelane.image

log() { echo "images: $*" >&2; }
fail() { log "$*"; exit 1; }

[ $# -ge 2 ] || fail "usage: $0 OPERATOR_IMAGE RUNNER_IMAGE [cuda|cpu]..."
OPERATOR_IMAGE=$1
RUNNER_IMAGE=$2
shift 2
FLAVOURS=(cuda cpu)
[ $# -eq 0 ] || FLAVOURS=("$@")
for f in "${FLAVOURS[@]}"; do [[ "$f" == cuda || "$f" == cpu ]] || fail "unknown flavour $f (cuda or cpu)"; done

root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_install() { # command package
  command -v "$1" >/dev/null && return
  root || fail "$1 is missing: install $2 (Debian: sudo apt-get install $2)"
  log "installing $2 with apt-get"
  apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

# A Docker engine: the one `docker` reaches, or, as root, dockerd started here. It runs without
# its own iptables rules or bridge: builds need no network, and the host's rules stay as they
# are. It is left running, like a system service, for the next build.
engine() {
  docker info >/dev/null 2>&1 && return
  root || fail "no Docker engine answers ('docker info' fails): start one or point DOCKER_HOST at one"
  apt_install dockerd docker.io
  exec 8>/run/framelane-dockerd.lock
  flock 8
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log /var/log/framelane-dockerd.log)"
    setsid nohup dockerd --iptables=false --bridge=none </dev/null >/var/log/framelane-dockerd.log 2>&1 8>&- &
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start; see /var/log/framelane-dockerd.log"
  fi
  exec 8>&-
}

# The runner's base image: BASE_IMAGE when Docker has it or can pull it; else (no registry) a
# Debian bookworm root filesystem from Debian packages: the essential set plus libstdc++,
# without documentation, about 55 MB.
base_image() {
  local want=${BASE_IMAGE:-debian:bookworm-slim}
  if docker image inspect "$want" >/dev/null 2>&1 || docker pull -q "$want" >/dev/null 2>&1; then
    echo "$want"
    return
  fi
  [ -z "${BASE_IMAGE:-}" ] || fail "Docker has no $BASE_IMAGE and cannot pull it"
  local tag=framelane.local/debian:bookworm
  local opts=(--variant=essential --include=libstdc++6 --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --skip=output/dev --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/info/*')
  local tar
  tar="$CACHE/images/debian-bookworm-$(printf '%s\n' "${opts[@]}" | sha256sum | cut -c1-12).tar"
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    if [ ! -f "$tar" ]; then
      log "$want cannot be pulled; making $tag from Debian packages with mmdebstrap (once, about a minute)"
      apt_install mmdebstrap mmdebstrap
      mkdir -p "$(dirname "$tar")"
      # mmdebstrap picks its output's format by the name's extension.
      mmdebstrap "${opts[@]}" bookworm "${tar%.tar}.tmp.tar" >&2
      mv "${tar%.tar}.tmp.tar" "$tar"
    fi
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      "$tar" "$tag" >/dev/null
  fi
  echo "$tag"
}

# Puts a file into a build context: a hard link where the file system allows one.
put() { # source destination
  mkdir -p "$(dirname "$2")"
  ln -f "$1" "$2" 2>/dev/null || cp "$1" "$2"
}

# The libraries of the torch wheel that the given files link, transitively (their NEEDED
# entries, looked up in torch/lib and nvidia/*/lib), as paths relative to the wheel's root.
wheel_closure() { # site-packages file...
  local site=$1
  shift
  local -A seen=()
  local queue=("$@") file lib found
  while [ "${#queue[@]}" -gt 0 ]; do
    file=${queue[0]}
    queue=("${queue[@]:1}")
    while read -r lib; do
      for found in "$site"/torch/lib/"$lib" "$site"/nvidia/*/lib/"$lib"; do
        [ -f "$found" ] || continue
        if [ -z "${seen[$found]:-}" ]; then
          seen[$found]=1
          queue+=("$found")
          echo "${found#"$site"/}"
        fi
        break
      done
    done < <(readelf -d "$file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  done
}

# What a flavour's image holds of the wheel: cpu, the libraries the runner links (libtorch_cpu,
# libc10, libgomp, and the CUDA runtime and CUPTI, which libtorch_cpu links); cuda, every
# shared library of torch/lib but torch's Python bindings, and of the nvidia-* wheels.
wheel_files() { # flavour site-packages runner-binary
  case $1 in
    cpu) wheel_closure "$2" "$3" ;;
    cuda)
      (cd "$2" && find torch/lib nvidia/*/lib -maxdepth 1 -name '*.so*' -type f \
        ! -name libtorch_python.so ! -name libshm.so ! -name libtorch_global_deps.so)
      ;;
  esac
}

engine
apt_install readelf binutils
cd "$REPO"
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
eval "$(gpu-runner/scripts/setup-torch.sh)"
SITE=$(dirname "$LIBTORCH")

if ! rustup target list --installed | grep -qx "$MUSL"; then
  log "adding the Rust target $MUSL (rustup)"
  rustup target add "$MUSL" >&2
fi
apt_install musl-gcc musl-tools

log "compiling framelane-operator ($MUSL, release) and framelane-runner (release)"
start=$SECONDS
# ring (TLS) and psm compile C for the musl target with musl's gcc wrapper.
CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked -p framelane-operator --target "$MUSL"
cargo build --release --locked -p framelane-runner
log "compiled in $((SECONDS - start)) s"

CONTEXTS="$TARGET/images"
build() { # image dockerfile context [docker build arguments]
  local image=$1 dockerfile=$2 context=$3
  shift 3
  local start=$SECONDS
  docker build --quiet --label "$LABEL=$image" -f "$dockerfile" -t "$image" "$@" "$context" >/dev/null
  log "built $image in $((SECONDS - start)) s: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.1f MB", $1 / 1e6}')"
}

rm -rf "$CONTEXTS/operator"
mkdir -p "$CONTEXTS/operator"
strip -o "$CONTEXTS/operator/framelane-operator" "$TARGET/$MUSL/release/framelane-operator"
build "$OPERATOR_IMAGE" operator/Dockerfile "$CONTEXTS/operator"
rm -rf "$CONTEXTS/operator"

BASE=$(base_image)
RUNNER="$TARGET/release/framelane-runner"
for flavour in "${FLAVOURS[@]}"; do
  image=$RUNNER_IMAGE
  [ "$flavour" = cuda ] || image="$RUNNER_IMAGE-$flavour"
  context="$CONTEXTS/runner-$flavour"
  rm -rf "$context"
  mkdir -p "$context"
  strip -o "$context/framelane-runner" "$RUNNER"
  while read -r file; do put "$SITE/$file" "$context/opt/torch/$file"; done < <(wheel_files "$flavour" "$SITE" "$RUNNER")
  build "$image" gpu-runner/Dockerfile "$context" --build-arg "BASE_IMAGE=$BASE"
  # The contexts are links into target/ and the wheel; the image has its own copy now.
  rm -rf "$context"
done
# Images these tags replaced, unless something still uses them.
docker image prune -f --filter "label=$LABEL" >/dev/null
