#!/usr/bin/env bash
# Creates (or updates) the Python venv used by tests/python and bench/, and
# installs their pinned requirements. Idempotent: when the venv already holds
# exactly these requirements it does nothing but print the path.
#
#   scripts/python-env.sh [REQUIREMENTS_FILE ...]
#
# Venv location: $CLAW_VENV, default <repo>/target/python-venv.
# The last line printed is the venv's python executable.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CLAW_VENV:-$repo/target/python-venv}"
python="${PYTHON:-python3}"
if [ "$#" -eq 0 ]; then
    set -- "$repo/tests/python/requirements.txt"
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" >&2
fi

# A stamp of the requirements' contents: re-install only when they change.
stamp="$venv/.claw-requirements.sha256"
want="$(cat "$@" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    args=()
    for req in "$@"; do args+=(-r "$req"); done
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${args[@]}" >&2
    echo "$want" >"$stamp"
fi

echo "$venv/bin/python"
