#!/usr/bin/env bash
# Install (or --uninstall) edgetok as systemd services: a runtime-only venv, example configs,
# the gateway and server units, and optionally the actuators drop-in. Run `install.sh --help`.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/.." && pwd)
ROOT=/
PREFIX=/opt/edgetok
PYTHON=python3
ACTION=install
WITH_ACTUATORS=0
PURGE=0
RELOAD=auto
UNITS_ONLY=0
UNITS=(edgetok-gateway.service edgetok-server.service)
DROPIN=edgetok-gateway.service.d/actuators.conf
# The unit files name this venv in ExecStart=; another --prefix rewrites that line.
DEFAULT_PREFIX=/opt/edgetok
SERVICE_USER=edgetok

usage() {
    cat <<EOF
Usage: $PROG [options]
       $PROG --uninstall [--purge] [options]

Installs edgetok as the systemd services edgetok-gateway.service and edgetok-server.service:
  1. creates a Python venv in PREFIX/venv and installs edgetok's runtime there (numpy,
     onnxruntime, MQTT and HTTP libraries; never torch or the model-building extra);
  2. copies configs/gateway.toml and configs/server.toml to /etc/edgetok/ unless they exist,
     and creates /etc/edgetok/credentials/ for the mqtt_password and api_token secrets;
  3. installs the units in /etc/systemd/system/ (and, with --with-actuators, the drop-in
     edgetok-gateway.service.d/actuators.conf plus a static '$SERVICE_USER' system user);
  4. runs 'systemctl daemon-reload' and prints the commands to run next.
Nothing is enabled or started: that is the next command.

Options:
  --prefix DIR        install root of the venv (default $DEFAULT_PREFIX; the venv is DIR/venv)
  --root DIR          treat DIR as the file system root, e.g. to build an image or to test;
                      skips systemctl and user creation (default /)
  --python PY         interpreter for the venv, Python >= 3.11 (default python3)
  --src DIR           the edgetok source tree to install (default: $SRC)
  --with-actuators    also install the actuators drop-in: CAP_NET_ADMIN for tc/iw, writable
                      cpufreq knobs, a delegated cgroup for the CPU quota (see the drop-in)
  --units-only        leave the venv alone; (re)install configs, units and drop-in only
  --no-reload         do not run 'systemctl daemon-reload'
  --uninstall         stop and disable the services, remove the units, drop-in and venv;
                      keeps /etc/edgetok and the state in /var/lib/edgetok
  --purge             with --uninstall: also remove /etc/edgetok, the state directory
                      (journal, results, bundles) and the static user
  -h, --help          show this help
EOF
}

CLEANUP=
trap '[ -z "$CLEANUP" ] || rm -rf "$CLEANUP"' EXIT
die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --src) SRC=${2:?--src needs a directory}; shift 2 ;;
        --src=*) SRC=${1#*=}; shift ;;
        --with-actuators) WITH_ACTUATORS=1; shift ;;
        --units-only) UNITS_ONLY=1; shift ;;
        --no-reload) RELOAD=no; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path: $PREFIX" ;; esac
[ "$PURGE" = 0 ] || [ "$ACTION" = uninstall ] || die "--purge only goes with --uninstall"
ROOT=$(cd "$ROOT" 2>/dev/null && pwd) || die "--root directory does not exist"
# R is prepended to every system path; empty for the real root.
R=${ROOT%/}
VENV=$PREFIX/venv
UNIT_DIR=/etc/systemd/system
CONF_DIR=/etc/edgetok
STATE_DIR=/var/lib/edgetok

if [ -z "$R" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo $PROG ...), or use --root DIR for an unprivileged staging install"
fi

# systemctl talks to the running manager, so only on the real root of a systemd-booted host.
have_systemd() { [ -z "$R" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

reload() {
    if [ "$RELOAD" = no ]; then
        say "skipped daemon-reload (--no-reload)"
    elif have_systemd; then
        systemctl daemon-reload
        say "ran systemctl daemon-reload"
    else
        say "not a systemd-booted root: run 'systemctl daemon-reload' on the target host"
    fi
}

install_venv() {
    local py_ok tmp
    command -v "$PYTHON" >/dev/null || die "no $PYTHON; install python3 (>= 3.11) and python3-venv"
    py_ok=$("$PYTHON" -c 'import sys; print(int(sys.version_info >= (3, 11)))')
    [ "$py_ok" = 1 ] || die "$PYTHON is older than 3.11"
    [ -f "$SRC/pyproject.toml" ] || die "no pyproject.toml in $SRC (use --src)"
    say "creating the venv $R$VENV"
    "$PYTHON" -m venv "$R$VENV" || die "venv creation failed (Debian: apt install python3-venv)"
    # Build from a clean copy: pip builds in the source tree, and the checkout may hold a
    # development venv, bundles and caches that do not belong in a wheel.
    tmp=$(mktemp -d)
    CLEANUP=$tmp
    tar -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./bundles --exclude=./var \
        --exclude=./artifacts --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./tests --exclude=./bench -cf - . | tar -C "$tmp" -xf -
    say "installing edgetok's runtime (no extras) into the venv"
    # No [build] extra: torch and the model toolchain are for building bundles, elsewhere.
    "$R$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$tmp" \
        || die "pip install failed"
    if "$R$VENV/bin/python" -c \
        'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)'; then
        die "torch ended up in $R$VENV; the runtime must not depend on it"
    fi
    [ -x "$R$VENV/bin/edgetok" ] || die "the venv has no edgetok command"
    rm -rf "$tmp"
    CLEANUP=
}

# Example configs resolve their state and bundles relative to the checkout; installed, they
# must point at the state directory, the only writable place under ProtectSystem=strict.
install_config() {
    local name=$1 role=$2 dest=$R$CONF_DIR/$1
    if [ -e "$dest" ]; then
        say "kept the existing $CONF_DIR/$name"
        return
    fi
    if [ ! -f "$SRC/configs/$name" ]; then
        say "warning: no example $SRC/configs/$name; write $CONF_DIR/$name yourself"
        return
    fi
    sed -E -e "s#^(state_dir[[:space:]]*=[[:space:]]*)\"[^\"]*\"#\\1\"$STATE_DIR/$role\"#" \
        -e "s#\"(\\.\\./)?bundles/([^\"]+)\"#\"$STATE_DIR/bundles/\\2\"#g" \
        "$SRC/configs/$name" > "$dest.tmp"
    chmod 0644 "$dest.tmp"
    mv "$dest.tmp" "$dest"
    say "installed the example $CONF_DIR/$name"
}

install_unit() {
    local name=$1 dest=$R$UNIT_DIR/$1
    sed -e "s#^ExecStart=$DEFAULT_PREFIX/venv/#ExecStart=$VENV/#" "$HERE/$name" > "$dest.tmp"
    chmod 0644 "$dest.tmp"
    mv "$dest.tmp" "$dest"
    say "installed $UNIT_DIR/$name"
}

create_user() {
    if [ -n "$R" ]; then
        say "alternate root: create the system user '$SERVICE_USER' on the target host"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        say "system user '$SERVICE_USER' exists"
    else
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "edgetok services" "$SERVICE_USER"
        say "created the system user '$SERVICE_USER'"
    fi
}

do_install() {
    if [ "$UNITS_ONLY" = 0 ]; then
        install_venv
    elif [ ! -x "$R$VENV/bin/edgetok" ]; then
        say "warning: --units-only, but $VENV/bin/edgetok does not exist yet"
    fi
    install -d -m 0755 "$R$CONF_DIR"
    install -d -m 0700 "$R$CONF_DIR/credentials"
    install_config gateway.toml gateway
    install_config server.toml server
    install -d -m 0755 "$R$UNIT_DIR"
    for unit in "${UNITS[@]}"; do install_unit "$unit"; done
    if [ "$WITH_ACTUATORS" = 1 ]; then
        install -d -m 0755 "$R$UNIT_DIR/${DROPIN%/*}"
        install -m 0644 "$HERE/$DROPIN" "$R$UNIT_DIR/$DROPIN"
        say "installed $UNIT_DIR/$DROPIN"
        create_user
    elif [ -e "$R$UNIT_DIR/$DROPIN" ]; then
        # Re-running without the flag withdraws the rights granted by an earlier install.
        rm -f "$R$UNIT_DIR/$DROPIN"
        rmdir "$R$UNIT_DIR/${DROPIN%/*}" 2>/dev/null || true
        say "removed $UNIT_DIR/$DROPIN (no --with-actuators)"
    fi
    # With DynamicUser= systemd moves this into /var/lib/private/edgetok on the first start.
    if [ ! -e "$R$STATE_DIR" ] && [ ! -e "$R/var/lib/private/edgetok" ]; then
        install -d -m 0755 "$R$STATE_DIR" "$R$STATE_DIR/bundles"
    fi
    reload
    cat <<EOF

edgetok is installed. Next:
  1. put a bundle (built elsewhere with 'edgetok build') in $STATE_DIR/bundles/ and check
     $CONF_DIR/gateway.toml (broker, streams, bundle path);
  2. secrets, if the broker or a non-loopback HTTP API needs them (mode 0600, root-owned):
     $CONF_DIR/credentials/mqtt_password and $CONF_DIR/credentials/api_token
  3. validate (CREDENTIALS_DIRECTORY lets the check read the secrets systemd will hand the
     service), then start on boot and now:
     sudo env CREDENTIALS_DIRECTORY=$CONF_DIR/credentials $VENV/bin/edgetok gateway --config $CONF_DIR/gateway.toml --check-config
     sudo systemctl enable --now edgetok-gateway.service
  (on the edge server: sudo env CREDENTIALS_DIRECTORY=$CONF_DIR/credentials
   $VENV/bin/edgetok server --config $CONF_DIR/server.toml --check-config, then
   sudo systemctl enable --now edgetok-server.service)
EOF
}

do_uninstall() {
    if have_systemd; then
        systemctl disable --now "${UNITS[@]}" 2>/dev/null || true
        say "stopped and disabled ${UNITS[*]}"
    fi
    for unit in "${UNITS[@]}"; do rm -f "$R$UNIT_DIR/$unit"; done
    rm -f "$R$UNIT_DIR/$DROPIN"
    rmdir "$R$UNIT_DIR/${DROPIN%/*}" 2>/dev/null || true
    say "removed the units and the drop-in"
    rm -rf "$R$VENV"
    rmdir "$R$PREFIX" 2>/dev/null || true
    say "removed the venv $VENV"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$R$CONF_DIR" "$R$STATE_DIR" "$R/var/lib/private/edgetok"
        say "purged $CONF_DIR and the state in $STATE_DIR"
        if [ -z "$R" ] && getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER" && say "removed the system user '$SERVICE_USER'"
        fi
    else
        say "kept $CONF_DIR and $STATE_DIR (add --purge to remove them)"
    fi
    reload
}

if [ "$ACTION" = install ]; then do_install; else do_uninstall; fi
