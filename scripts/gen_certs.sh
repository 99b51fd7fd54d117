#!/usr/bin/env bash
# Make a development CA and server certificate (see certs/README.md).
#
# usage: scripts/gen_certs.sh [--out DIR] [--host NAME]... [--force] [--days N]
#
# DIR defaults to certs/ in the repository, wherever this is run from. Works on a fresh
# clone: it uses .venv if that can import cryptography, else python3 if it can, else it
# creates .venv and installs the project into it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# What chat.certs needs: Python 3.11 and a cryptography new enough to have the
# X.509 verifier (42+).
can_run() {
    "$1" -c 'import sys, cryptography.x509.verification; sys.exit(sys.version_info < (3, 11))' \
        >/dev/null 2>&1
}

if can_run "$REPO/.venv/bin/python"; then
    py="$REPO/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1 && can_run python3; then
    py=python3
else
    # shellcheck source=scripts/_venv.sh
    source "$REPO/scripts/_venv.sh"
    py="$(ensure_venv)"
fi

# PYTHONPATH puts this checkout's chat/ ahead of any installed (possibly older) copy.
# The --out default comes first so that a --out the caller gives wins (argparse keeps the last).
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m chat.certs --out "$REPO/certs" "$@"
