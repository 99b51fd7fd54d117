#!/usr/bin/env bash
# Makes a new Alembic migration in migrations/versions/ from the difference between
# chat/models.py and the schema the existing migrations build (autogenerate), against a
# scratch SQLite database. Read and edit the result before committing it.
#   scripts/new_migration.sh "add a topic to rooms"
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 MESSAGE" >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_venv.sh
source "$repo/scripts/_venv.sh"
py="$(ensure_venv)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$py" - "$1" "sqlite:///$scratch/scratch.db" <<'PY'
import sys
from alembic import command
from chat.db import alembic_config, make_engine, upgrade_to_head
message, url = sys.argv[1], sys.argv[2]
upgrade_to_head(make_engine(url))
command.revision(alembic_config(url), message=message, autogenerate=True)
PY
