#!/bin/sh
# Install what the VM tiers need on the host (Debian/Ubuntu): QEMU for x86-64,
# kexec-tools (the 9p guest runs the host's /sbin/kexec), and for the systemd
# tier mmdebstrap and e2fsprogs (tools/vm/systemd_image.py builds a Debian
# sid image with them). Idempotent and quiet: does nothing when all are there.
set -eu

missing=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$missing qemu-system-x86"
[ -x /sbin/kexec ] || [ -x /usr/sbin/kexec ] || command -v kexec >/dev/null 2>&1 \
    || missing="$missing kexec-tools"
command -v mmdebstrap >/dev/null 2>&1 || missing="$missing mmdebstrap"
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] \
    || missing="$missing e2fsprogs"
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
