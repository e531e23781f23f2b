#!/bin/sh
# Install what the VM tier needs on the host (Debian/Ubuntu): QEMU for x86-64
# and kexec-tools (the guest runs the host's /sbin/kexec). Idempotent and
# quiet: does nothing when both are already there.
set -eu

missing=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$missing qemu-system-x86"
[ -x /sbin/kexec ] || [ -x /usr/sbin/kexec ] || command -v kexec >/dev/null 2>&1 \
    || missing="$missing kexec-tools"
[ -z "$missing" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: need$missing but apt-get is not available; install them by hand" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "install-deps: need$missing; run as root or install sudo" >&2
        exit 1
    }
    sudo=sudo
fi
echo "install-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# shellcheck disable=SC2086  # $missing is a list of package names
if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "install-deps: apt-get failed (see above)" >&2
    exit 1
fi
rm -f "$log"
