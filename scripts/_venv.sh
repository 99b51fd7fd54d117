# shellcheck shell=bash
# Shared bootstrap for scripts/*: source this file, then `py=$(ensure_venv [EXTRA])`.
#
# ensure_venv makes sure $REPO/.venv exists and has this project installed in editable mode
# (so the tests and the server run the code in this checkout), with the optional-dependency
# group EXTRA, e.g. "test"; then it prints the venv's python on stdout.
# Everything else it says goes to stderr, so the command substitution captures only the path.
# It reinstalls only when pyproject.toml is newer than a stamp file inside the venv, so
# calling it on every run costs a stat, not a pip run.
# Needs only Python >= 3.11 (as `python3`, or $PYTHON) with the venv module.

_VENV_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ensure_venv() {
    local extra="${1:-}"
    local venv="$_VENV_REPO/.venv"
    local stamp="$venv/.chat-installed-${extra:-base}"
    local target="$_VENV_REPO"
    [[ -n "$extra" ]] && target="$_VENV_REPO[$extra]"

    if [[ ! -x "$venv/bin/python" ]]; then
        local base="${PYTHON:-python3}"
        if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "error: need Python >= 3.11 as '$base' (or set PYTHON=/path/to/python3.11)" >&2
            return 1
        fi
        echo "creating $venv ..." >&2
        "$base" -m venv "$venv" >&2 || return 1
        rm -f "$venv"/.chat-installed-*  # a fresh venv has nothing installed, whatever stamps say
    fi

    if [[ ! -e "$stamp" || "$_VENV_REPO/pyproject.toml" -nt "$stamp" ]]; then
        echo "installing $_VENV_REPO${extra:+ with [$extra]} into $venv ..." >&2
        # `python -m pip` rather than bin/pip: it still works if the checkout was moved,
        # which breaks the absolute shebang line in bin/pip.
        "$venv/bin/python" -m pip install -q -e "$target" >&2 || return 1
        touch "$stamp" || return 1
    fi
    printf '%s\n' "$venv/bin/python"
}
