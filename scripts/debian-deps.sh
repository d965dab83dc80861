#!/usr/bin/env bash
# The Debian packages the project needs beyond the toolchain, installed only when missing
# (idempotent: with everything present it changes nothing and never touches the network).
#
# build: what the Rust build needs
#   cmake                 builds the bundled librdkafka (rdkafka's `cmake-build` feature)
#   libcurl4-openssl-dev  librdkafka's HTTP client headers (without it: `curl/curl.h: No such file`)
#   pkg-config            lets build scripts find the system libraries
#   libssl-dev            OpenSSL headers for librdkafka's TLS (and crates that link OpenSSL)
#   g++                   C/C++ compiler for librdkafka and other native code
# test: what the tests start besides the project's own binaries
#   nginx-light           the reverse proxy in front of the gateway (nginx/conf.d)
#   chromium              the headless browser of the console's browser tests (Playwright drives
#                         /usr/bin/chromium; Playwright's own browser downloads don't work here)
#
# Usage: scripts/debian-deps.sh build|test   (as root, or with passwordless sudo)
set -euo pipefail

SET="${1:-}"
case "$SET" in
  build) PACKAGES=(cmake libcurl4-openssl-dev pkg-config libssl-dev g++) ;;
  test) PACKAGES=(nginx-light chromium) ;;
  *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac

export DEBIAN_FRONTEND=noninteractive

log() { printf 'debian-deps %s: %s\n' "$SET" "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  # `dpkg -s` also lists removed-but-configured packages; insist on "install ok installed".
  if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" = 0 ]; then
  log "all present: ${PACKAGES[*]}"
  exit 0
fi

log "apt-get update"
as_root apt-get update -qq >&2
log "apt-get install ${missing[*]}"
as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
log "installed: ${missing[*]}"
