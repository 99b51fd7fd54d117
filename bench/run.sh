#!/usr/bin/env bash
# Runs the benchmark from a fresh clone: installs the project (scripts/_venv.sh), starts
# each server in turn on a free loopback port, runs the workloads, stops every process it
# started, and prints one table. Options go to bench/run.py (see --help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_venv.sh
source "$repo/scripts/_venv.sh"
py="$(ensure_venv)"
cd "$repo"
exec "$py" bench/run.py "$@"
