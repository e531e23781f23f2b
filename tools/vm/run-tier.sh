#!/bin/sh
# The real-kernel (VM) tier, as CI runs it: install QEMU and kexec-tools if
# missing, then run tests/vm, which boots the LUO kernel through tools/vmtest
# for each suite and prints the guest's pass counts at the end.
#
# Usage: tools/vm/run-tier.sh [extra pytest arguments]
# Env:   LIVEUPDATE_VM_KERNEL  kernel image (default ../shared/vm/bzImage)
#        PYTHON                interpreter (default python3)
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo" || exit 2
python=${PYTHON:-python3}
kernel=${LIVEUPDATE_VM_KERNEL:-$(dirname "$repo")/shared/vm/bzImage}

if [ ! -f "$kernel" ]; then
    echo "VM tier: skipped, no kernel image at $kernel (set LIVEUPDATE_VM_KERNEL)"
    exit 0
fi
start=$(date +%s)
echo "VM tier: installing qemu-system-x86 and kexec-tools if missing"
tools/vm/install-deps.sh || { echo "VM tier: FAILED to install its dependencies" >&2; exit 1; }
echo "VM tier: kernel $kernel ($(( $(date +%s) - start )) s so far)"

# CI=1 turns a missing QEMU or selftest into a failure instead of a skip.
CI=${CI:-1} LIVEUPDATE_VM_KERNEL=$kernel \
    "$python" -m pytest tests/vm -p no:cacheprovider -v -rfEs --durations=0 "$@"
rc=$?
elapsed=$(( $(date +%s) - start ))
if [ "$rc" = 0 ]; then
    echo "VM tier: passed in ${elapsed} s"
else
    echo "VM tier: FAILED (pytest exit $rc) after ${elapsed} s" >&2
fi
exit "$rc"
