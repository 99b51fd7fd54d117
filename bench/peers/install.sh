#!/usr/bin/env bash
# Install the peer IRC servers used by the benchmark: ngIRCd and InspIRCd from Debian,
# miniircd from PyPI into its own venv. Idempotent: safe to run again; it installs only
# what is missing, and it leaves no daemon of these packages running or enabled.
#
#   sudo bash bench/peers/install.sh          (we run as root on the bench machines)
#
# Env: PYTHON (default: python3.11, else python3) for the miniircd venv;
#      MINIIRCD_VERSION (default 2.3) to pin miniircd.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-miniircd"
MINIIRCD_VERSION="${MINIIRCD_VERSION:-2.3}"
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (apt-get install)" >&2
    exit 1
fi

stop_daemons() {
    # The packages ship init scripts / systemd units that start a daemon on the default
    # IRC ports. Stop and disable them, whatever init system there is (or none).
    local svc
    for svc in ngircd inspircd; do
        if command -v systemctl >/dev/null 2>&1; then
            # stop needs a running systemd; disable also works offline (removes the links)
            [ -d /run/systemd/system ] && { systemctl stop "$svc" >/dev/null 2>&1 || true; }
            systemctl disable "$svc" >/dev/null 2>&1 || true
        fi
        if [ -x "/etc/init.d/$svc" ]; then
            "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1 && [ -e "/etc/init.d/$svc" ]; then
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
    # Anything still running from the system packages (a daemon that some other init
    # started): their pid files say which process; kill it only if it really is that
    # daemon binary (a stale pid file may name an unrelated process by now). Our own bench
    # servers (bench/peers/start.py) write no pid file there and are left alone.
    local pidfile pid exe bin
    for pidfile in /run/ngircd/ngircd.pid /var/run/ngircd/ngircd.pid \
                   /run/inspircd/inspircd.pid /var/run/inspircd/inspircd.pid; do
        [ -f "$pidfile" ] || continue
        case "$pidfile" in *ngircd*) bin=/usr/sbin/ngircd ;; *) bin=/usr/sbin/inspircd ;; esac
        pid="$(tr -dc 0-9 < "$pidfile" 2>/dev/null || true)"
        exe="$( [ -n "$pid" ] && readlink "/proc/$pid/exe" 2>/dev/null || true)"
        if [ -n "$pid" ] && [ "$exe" = "$bin" ]; then
            echo "install.sh: stopping $bin (pid $pid, from $pidfile)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

apt_updated=""
apt_install() {
    # Debian's lists may be missing or stale on a fresh machine: update once per run.
    if [ -z "$apt_updated" ]; then apt-get update; apt_updated=1; fi
    apt-get install -y --no-install-recommends "$@"
}

need=()
dpkg-query -W -f='${Status}' ngircd 2>/dev/null | grep -q "install ok installed" || need+=(ngircd)
dpkg-query -W -f='${Status}' inspircd 2>/dev/null | grep -q "install ok installed" || need+=(inspircd)

if [ "${#need[@]}" -gt 0 ]; then
    # Forbid service starts during the install: invoke-rc.d honours policy-rc.d (exit 101
    # = action forbidden). Only add one if the machine has none, and remove it after.
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
        trap '[ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install "${need[@]}"
    if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; added_policy=""; fi
fi
stop_daemons

# miniircd: a venv of its own, so that it never touches the project's environment.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$VENV"  # missing, or half made by an earlier failed run
    if ! "$PY" -c "import ensurepip, venv" >/dev/null 2>&1; then
        apt_install python3-venv  # Debian ships ensurepip separately
    fi
    "$PY" -m venv "$VENV" || {
        rm -rf "$VENV"
        apt_install python3-venv
        "$PY" -m venv "$VENV"
    }
fi
if ! "$VENV/bin/python" -m pip show miniircd 2>/dev/null | grep -qx "Version: $MINIIRCD_VERSION"; then
    "$VENV/bin/python" -m pip install --quiet "miniircd==$MINIIRCD_VERSION"
fi

echo "ngircd:   $(dpkg-query -W -f='${Version}' ngircd)  ($(/usr/sbin/ngircd --version 2>/dev/null | head -1))"
echo "inspircd: $(dpkg-query -W -f='${Version}' inspircd)  ($(/usr/sbin/inspircd --version 2>/dev/null | head -1))"
echo "miniircd: $("$VENV/bin/python" -m pip show miniircd | sed -n 's/^Version: //p')  ($VENV/bin/miniircd, $("$VENV/bin/python" --version))"
