#!/bin/sh
# PID 1 of the tools/vmtest guest.
#
# The guest's root is the host's "/" over read-only 9p, so this script lives
# in the host's work tree and runs from there. It sets up the few writable
# places a test run needs, runs the stage command described by the job file
# that tools/vmtest wrote into the writable share, and then either kexecs into
# the same kernel (stage 1 of a round trip) or powers the machine off.
#
# Lines starting with "@@vmtest " go to the serial console on purpose: the host
# reads them to print progress and to know how far the guest got, even when
# the share could not be written.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() {
    echo "@@vmtest $*"
}

# Power off whatever happened: sysrq needs no userspace. The wait is a shell
# builtin loop because programs paged in from the 9p root fault (SIGBUS) once
# the power-off has shut its device down. If init still exits, the kernel
# panics and panic=-1 with QEMU's -no-reboot ends the machine anyway.
power_off() {
    sync
    echo o > /proc/sysrq-trigger
    while :; do :; done
}

# Errors are ignored for mounts the kernel may already have made
# (CONFIG_DEVTMPFS_MOUNT mounts /dev itself).
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run || { say "error: cannot mount tmpfs on /run"; power_off; }
mkdir -p /run/out /run/tmp /run/home /dev/shm
chmod 1777 /run/tmp
mount -t tmpfs tmpfs /dev/shm 2>/dev/null

if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /run/out; then
    say "error: cannot mount the results share (tag 'out')"
    power_off
fi

# A kernel started by a KHO kexec exposes what it was handed in kho/in.
if [ -e /sys/kernel/debug/kho/in ]; then
    stage=2
else
    stage=1
fi

job=/run/out/job.env
if [ ! -r "$job" ]; then
    say "error: no job file at $job"
    power_off
fi
# The job file is written by tools/vmtest with every value shell-quoted.
. "$job"

if [ "$stage" = 1 ]; then
    command=$VMTEST_STAGE1
else
    command=$VMTEST_STAGE2
fi

if [ -z "$command" ]; then
    say "error: booted into stage $stage but the job has no command for it"
    power_off
fi

export HOME=/run/home TMPDIR=/run/tmp PYTHONDONTWRITEBYTECODE=1
export PATH="$VMTEST_PATH"
export PYTHONPATH="$VMTEST_PYTHONPATH"
export LIVEUPDATE_STAGE="$stage"
export LIVEUPDATE_VM_OUT=/run/out
export LIVEUPDATE_VM_KERNEL="$VMTEST_KERNEL"
# Set only in stage 1 of a round trip: tells a command that may kexec by
# itself (liveupdate.testing) that a stage 2 will follow.
if [ "$stage" = 1 ] && [ -n "$VMTEST_STAGE2" ]; then
    export LIVEUPDATE_VM_KEXEC=1
else
    unset LIVEUPDATE_VM_KEXEC
fi
if [ -n "$VMTEST_ENV" ]; then
    eval "export $VMTEST_ENV"
fi

# Test programs may hold thousands of sessions and files at once.
ulimit -n 65536 2>/dev/null

say "stage $stage start"
cd "$VMTEST_CWD" || { say "error: cannot cd to $VMTEST_CWD"; power_off; }
sh -c "$command" < /dev/null
rc=$?
echo "$rc" > "/run/out/stage$stage.rc"
say "stage $stage exit $rc"

if [ "$stage" = 1 ] && [ -n "$VMTEST_STAGE2" ]; then
    if [ "$rc" != 0 ]; then
        say "not kexecing: stage 1 failed"
        power_off
    fi
    say "kexec"
    sync
    if kexec -s -l "$VMTEST_KERNEL" --reuse-cmdline; then
        kexec -e
    fi
    say "error: kexec failed"
fi

say "done"
power_off
