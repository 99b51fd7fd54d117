#!/usr/bin/env bash
# Grades the server's TLS with sslyze against Mozilla's "intermediate" and "modern" profiles.
# sslyze pins an older cryptography than the project, so it gets a venv of its own
# (.venv-sslyze); the TLS tests then run with CHAT_SSLYZE_PYTHON pointing at it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-sslyze"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sslyze' 2>/dev/null; then
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q sslyze
fi
# shellcheck source=scripts/_venv.sh
source "$repo/scripts/_venv.sh"
py="$(ensure_venv test)"
cd "$repo"
CHAT_SSLYZE_PYTHON="$venv/bin/python" exec "$py" -m pytest -q tests/test_tls.py "$@"
