#!/usr/bin/env python3
"""Build, or reuse, the disk image of the real-systemd guest tier.

The guest is Debian sid (the first suite with a systemd that speaks Live
Update: 261 or later) with systemd as PID 1, python3, python3-cffi, pytest
and kexec-tools, this project installed into its python3 with Debian's own
pip, the LUO kernel at ``/boot/bzImage`` and ``vmtest-stage.service``, which
runs the stage commands of ``tools/vmtest --image``.

Two layers, each cached by a hash of its inputs under ``--cache`` (default
``$LIVEUPDATE_VM_CACHE``, else ``~/.cache/liveupdate/vm``):

base-HASH.tar
    ``mmdebstrap`` of the package list; the expensive part (a download of
    about 60 MB, 40-70 s). Its inputs are the suite, mirror and package list.
image-HASH.img
    a sparse ext4 image made from the base plus the guest configuration, the
    kernel and the project (a few seconds), keyed by the base and the bytes
    of every input file.

The systemd version is checked before anything boots: below 261 the build
fails with one line saying so. Must run as root (mmdebstrap, chroot and
``mkfs.ext4 -d`` keep the tree's owners).

Usage: ``tools/vm/systemd_image.py [--kernel PATH] [--cache DIR] [--print-path]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GUEST_FILES = os.path.join(HERE, "systemd")
DEFAULT_KERNEL = os.path.join(os.path.dirname(REPO), "shared", "vm", "bzImage")

SUITE = "sid"
MIRROR = "http://deb.debian.org/debian"
MIN_SYSTEMD = 261
PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus",
    # --variant=apt leaves it out, and without it every .mount unit fails
    # (debugfs included, where kho/in tells a kexec'd kernel).
    "mount",
    "kexec-tools", "procps", "util-linux",
    "python3", "python3-cffi", "python3-pytest",
    # To install the project with the guest's own interpreter, offline.
    "python3-pip", "python3-setuptools", "python3-wheel",
]
EXCLUDES = ["/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/man/*", "/usr/share/info/*"]
# Bumped when the recipe changes in a way the inputs above do not show.
RECIPE = 1
IMAGE_SIZE = "2G"
KEEP_IMAGES = 3


class BuildError(Exception):
    """What stops the build, said in one line with what to do about it."""


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.start = time.monotonic()
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            print("systemd-image: [%6.1fs] %s" % (time.monotonic() - self.start, msg),
                  file=sys.stderr, flush=True)


def default_cache() -> str:
    env = os.environ.get("LIVEUPDATE_VM_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "liveupdate", "vm")


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:20]


def base_key() -> str:
    recipe = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES,
              "excludes": EXCLUDES, "recipe": RECIPE}
    return _digest([json.dumps(recipe, sort_keys=True).encode()])


def project_files() -> List[str]:
    """The files that make up the installed project (relative to REPO)."""
    try:
        out = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard", "--", "liveupdate", "cdefs", "setup.py",
                              "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"],
                             check=True, capture_output=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for top in ("liveupdate", "cdefs"):
            for root, dirs, files in os.walk(os.path.join(REPO, top)):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                names += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
        names += [n for n in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")
                  if os.path.exists(os.path.join(REPO, n))]
    return sorted(n for n in names if os.path.isfile(os.path.join(REPO, n)))


def guest_files() -> List[str]:
    return sorted(os.path.relpath(os.path.join(root, f), GUEST_FILES)
                  for root, _, files in os.walk(GUEST_FILES) for f in files)


def _file_parts(root: str, names: Sequence[str]) -> Iterable[bytes]:
    for name in names:
        yield name.encode()
        with open(os.path.join(root, name), "rb") as f:
            yield f.read()


def image_key(base: str, kernel: str) -> str:
    with open(kernel, "rb") as f:
        kernel_sum = hashlib.sha256(f.read()).hexdigest().encode()
    parts = [base.encode(), kernel_sum, str(RECIPE).encode(), IMAGE_SIZE.encode()]
    parts += list(_file_parts(REPO, project_files()))
    parts += list(_file_parts(GUEST_FILES, guest_files()))
    return _digest(parts)


def _run(argv: Sequence[str], what: str, log: str) -> None:
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(argv) + "\n").encode())
        out.flush()
        rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log, "rb") as f:
            tail = f.read()[-3000:].decode("utf-8", "replace")
        raise BuildError("%s failed (exit %d); the last lines of %s:\n%s" % (what, rc, log, tail))


def _package_versions(tar_path: str) -> Dict[str, str]:
    """Installed package versions, from the tree's dpkg status file."""
    with tarfile.open(tar_path) as tar:
        for candidate in ("./var/lib/dpkg/status", "var/lib/dpkg/status"):
            try:
                member = tar.extractfile(candidate)
            except KeyError:
                continue
            if member is not None:
                text = member.read().decode("utf-8", "replace")
                break
        else:
            raise BuildError("%s has no var/lib/dpkg/status; delete it and build again" % tar_path)
    versions: Dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if "Package" in fields and "installed" in fields.get("Status", ""):
            versions[fields["Package"]] = fields.get("Version", "")
    return versions


def check_systemd(versions: Dict[str, str], where: str) -> str:
    version = versions.get("systemd")
    if not version:
        raise BuildError("%s has no systemd package installed" % where)
    m = re.match(r"(?:\d+:)?(\d+)", version)
    if not m or int(m.group(1)) < MIN_SYSTEMD:
        raise BuildError("%s has systemd %s; the tier needs systemd >= %d, which speaks Live Update "
                         "(Debian sid has it; trixie has 257)" % (where, version, MIN_SYSTEMD))
    return version


def build_base(cache: str, progress: Progress, log: str) -> str:
    key = base_key()
    path = os.path.join(cache, "base-%s.tar" % key)
    if os.path.exists(path):
        progress.say("base %s: cached" % os.path.basename(path))
        return path
    if shutil.which("mmdebstrap") is None:
        raise BuildError("mmdebstrap not found; install it (Debian package mmdebstrap): "
                         "apt-get install mmdebstrap")
    progress.say("building base: mmdebstrap %s with %d packages (downloads, about a minute)"
                 % (SUITE, len(PACKAGES)))
    tmp = path[:-len(".tar")] + ".part-%d.tar" % os.getpid()
    argv = ["mmdebstrap", "--variant=apt", "--mode=root", "--format=tar",
            # The sid Release file served here can be past its Valid-Until.
            "--aptopt=Acquire::Check-Valid-Until \"false\"",
            "--include=" + ",".join(PACKAGES)]
    argv += ["--dpkgopt=path-exclude=%s" % pattern for pattern in EXCLUDES]
    argv += [SUITE, tmp, MIRROR]
    try:
        _run(argv, "mmdebstrap", log)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    progress.say("base built: %s (%d MB)" % (os.path.basename(path), os.path.getsize(path) >> 20))
    return path


def _write(root: str, rel: str, text: str, mode: int = 0o644) -> None:
    path = os.path.join(root, rel.lstrip("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


# Units that cost boot time under TCG and do nothing for the tier.
MASKED = [
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "dev-hugepages.mount",
    "dev-mqueue.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount",
    "modprobe@.service", "systemd-modules-load.service", "getty@.service",
    "serial-getty@.service", "console-getty.service", "getty.target", "timers.target",
    "systemd-tmpfiles-clean.timer", "apt-daily.timer", "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer", "systemd-firstboot.service",
    "systemd-networkd-wait-online.service", "systemd-timesyncd.service",
]


def configure(root: str, kernel: str) -> None:
    """The guest's configuration on top of the base tree."""
    # An empty machine-id means "first boot", which runs first-boot jobs
    # and presets; a fixed one does not. The .updated files skip the
    # ConditionNeedsUpdate= jobs on every fresh image.
    _write(root, "etc/machine-id", "4c756f54696572a5b0e1f00dcafe0001\n", 0o444)
    _write(root, "etc/fstab", "# the root comes from the kernel command line; nothing else\n")
    _write(root, "etc/hostname", "luo-systemd\n")
    for stamp in ("etc/.updated", "var/.updated"):
        _write(root, stamp, "")
    for unit in MASKED:
        link = os.path.join(root, "etc/systemd/system", unit)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink("/dev/null", link)
    # A persistent journal: a failed run brings back every boot's log.
    os.makedirs(os.path.join(root, "var/log/journal"), exist_ok=True)
    os.makedirs(os.path.join(root, "boot"), exist_ok=True)
    shutil.copyfile(kernel, os.path.join(root, "boot/bzImage"))
    for rel in guest_files():
        src = os.path.join(GUEST_FILES, rel)
        with open(src, encoding="utf-8") as f:
            text = f.read()
        executable = os.access(src, os.X_OK)
        _write(root, rel, text, 0o755 if executable else 0o644)
    wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants")
    os.makedirs(wants, exist_ok=True)
    link = os.path.join(wants, "vmtest-stage.service")
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/vmtest-stage.service", link)


def install_project(root: str, log: str) -> None:
    """pip-install this project into the guest's python3, offline, with
    Debian's setuptools (no build isolation: nothing can be downloaded)."""
    src = os.path.join(root, "usr/src/liveupdate")
    if os.path.exists(src):
        shutil.rmtree(src)
    for rel in project_files():
        dst = os.path.join(src, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(REPO, rel), dst)
    _run(["chroot", root, "python3", "-m", "pip", "install", "--quiet", "--no-deps",
          "--no-build-isolation", "--no-index", "--break-system-packages",
          "--root-user-action=ignore", "--no-cache-dir", "/usr/src/liveupdate"],
         "pip install of the project in the guest tree", log)
    shutil.rmtree(src)


def build_image(base: str, kernel: str, cache: str, progress: Progress, log: str) -> str:
    key = image_key(os.path.basename(base), kernel)
    path = os.path.join(cache, "image-%s.img" % key)
    if os.path.exists(path):
        progress.say("image %s: cached" % os.path.basename(path))
        return path
    progress.say("building image: base + configuration + kernel + project")
    work = tempfile.mkdtemp(prefix="systemd-image-", dir=cache)
    tmp = path[:-len(".img")] + ".part-%d.img" % os.getpid()
    try:
        root = os.path.join(work, "root")
        os.mkdir(root)
        _run(["tar", "-C", root, "--numeric-owner", "-xpf", base], "unpacking the base", log)
        configure(root, kernel)
        install_project(root, log)
        _run(["mkfs.ext4", "-q", "-F", "-L", "luo-systemd", "-d", root, tmp, IMAGE_SIZE],
             "mkfs.ext4", log)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune(cache, keep=path)
    progress.say("image built: %s" % path)
    return path


def _prune(cache: str, keep: str) -> None:
    images = sorted((os.path.join(cache, n) for n in os.listdir(cache)
                     if n.startswith("image-") and n.endswith(".img")),
                    key=os.path.getmtime, reverse=True)
    for old in images[KEEP_IMAGES:]:
        if old != keep:
            os.unlink(old)


def ensure_image(kernel: Optional[str] = None, cache: Optional[str] = None,
                 progress: Optional[Progress] = None) -> str:
    """The path of an up-to-date image, building what is missing."""
    progress = progress or Progress()
    kernel = kernel or DEFAULT_KERNEL
    if not os.path.isfile(kernel):
        raise BuildError("kernel image %s not found; pass --kernel PATH" % kernel)
    if os.geteuid() != 0:
        raise BuildError("building the systemd guest image needs root (mmdebstrap, chroot, mkfs.ext4 -d)")
    if shutil.which("mkfs.ext4") is None:
        raise BuildError("mkfs.ext4 not found; install e2fsprogs")
    cache = cache or default_cache()
    os.makedirs(cache, exist_ok=True)
    log = os.path.join(cache, "build.log")
    base = build_base(cache, progress, log)
    versions = _package_versions(base)
    systemd = check_systemd(versions, os.path.basename(base))
    progress.say("guest: systemd %s, python3 %s, python3-cffi %s" % (
        systemd, versions.get("python3", "?"), versions.get("python3-cffi", "?")))
    return build_image(base, kernel, cache, progress, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default=os.environ.get("LIVEUPDATE_VM_KERNEL") or DEFAULT_KERNEL)
    p.add_argument("--cache", default=None, help="cache directory (default %s)" % default_cache())
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        path = ensure_image(args.kernel, args.cache, Progress(args.quiet))
    except BuildError as exc:
        print("systemd-image: error: %s" % exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
