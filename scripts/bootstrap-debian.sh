#!/usr/bin/env bash
# System packages a fresh Debian machine needs: a C/C++ toolchain and cmake (to build llama.cpp),
# the venv module, redis-server (the demo and tests start their own) and prometheus (its
# promtool and server check the alert rules and dashboard queries in the tests). Installs only what is
# missing; needs root (or sudo) only when something is missing.
set -euo pipefail
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++ build-essential)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
"${PYTHON:-python3}" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "bootstrap: installing ${missing[*]}" >&2
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}"
