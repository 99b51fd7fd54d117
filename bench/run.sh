#!/usr/bin/env bash
# Runs the benchmark from a fresh clone: installs the project (scripts/_venv.sh) and, when
# an IRC peer is asked for (the default) with (a) or (b), the peers (bench/peers/install.sh:
# Debian packages and a miniircd venv; idempotent, needs root for apt), starts each server
# in turn on a free loopback port, runs the workloads, stops every process it started, and
# prints the tables. Options go to bench/run.py (see --help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_venv.sh
source "$repo/scripts/_venv.sh"
py="$(ensure_venv)"
cd "$repo"
servers="chat,naive,ngircd,inspircd,miniircd"
workloads="a,b,c,d,e"
prev=""
for arg in "$@"; do
    case "$prev" in --servers) servers="$arg" ;; --workloads) workloads="$arg" ;; esac
    case "$arg" in
        --servers=*) servers="${arg#--servers=}" ;;
        --workloads=*) workloads="${arg#--workloads=}" ;;
    esac
    prev="$arg"
done
# The peers run (a) and (b) only.
if [[ ",$servers," =~ ,(ngircd|inspircd|miniircd), && ",$workloads," =~ ,(a|b), ]]; then
    bash bench/peers/install.sh >&2
fi
exec "$py" bench/run.py "$@"
