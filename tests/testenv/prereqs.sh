#!/usr/bin/env bash
# What `just demo` and `just test` need besides what they build themselves, checked before
# anything long starts: the toolchains must be there (install them, or this says which is
# missing); the rest is installed here when this machine allows it (rustfmt and clippy with
# rustup, ffprobe from Debian's ffmpeg as root), else this stops at once saying what to run.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

missing() { log "$1 is missing: $2"; exit 1; }

command -v go >/dev/null || missing go "install Go 1.26 (https://go.dev/dl) and put it on PATH"
command -v cargo >/dev/null || missing cargo "install Rust with rustup and put ~/.cargo/bin on PATH"
command -v python3 >/dev/null || missing python3 "install Python 3.11 with pip and venv"
python3 -c 'import venv, ensurepip' 2>/dev/null \
  || missing "python3's venv" "install it (Debian: apt-get install python3-venv)"
for tool in curl openssl git; do
  command -v "$tool" >/dev/null || missing "$tool" "install it (Debian: apt-get install $tool)"
done
command -v ps >/dev/null || missing ps "install procps (Debian: apt-get install procps)"
# The runner's C++ shim, torch-sys and ring compile C and C++.
for tool in cc c++; do
  command -v "$tool" >/dev/null || missing "$tool" "install a C and C++ compiler (Debian: apt-get install g++)"
done

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null || missing "cargo fmt or cargo clippy" "install rustfmt and clippy for your toolchain"
  log "installing rustfmt and clippy (rustup component add)"
  rustup component add rustfmt clippy >&2
fi

# The runner's tests check its MP4s with ffprobe.
if ! command -v ffprobe >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ffmpeg (for ffprobe) with apt-get"
    apt-get update -qq >&2 && apt-get install -y -qq ffmpeg >/dev/null
  else
    missing ffprobe "install ffmpeg (Debian: sudo apt-get install ffmpeg), then run this again"
  fi
fi

# operator/tests/fencing.rs skews a leader's clock with libfaketime (Debian's faketime).
if ! compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null \
  && [ ! -e /usr/lib/faketime/libfaketime.so.1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing faketime (libfaketime) with apt-get"
    apt-get update -qq >&2 && apt-get install -y -qq faketime >/dev/null
  else
    missing libfaketime "install faketime (Debian: sudo apt-get install faketime), then run this again"
  fi
fi
