#!/usr/bin/env bash
# Install the tools bench/suite.py compares backupfs with (Debian 12 package names, checked
# with apt-cache): debootstrap (the benchmark's file tree), rclone (`rclone mount :http:`),
# httpdirfs, nbdkit (its curl plugin ships in the nbdkit package itself) and libnbd-bin
# (nbdfuse). Also what the suite itself uses: nginx, curl, fuse3, util-linux (losetup,
# sfdisk), e2fsprogs. backupfs's own dependencies come from contrib/setup.sh.
# Idempotent: installs only what is missing.
set -euo pipefail

packages=(debootstrap rclone httpdirfs nbdkit libnbd-bin nginx curl fuse3 util-linux fdisk e2fsprogs)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The kernel module is not needed: nbdfuse serves the NBD export as a file over FUSE.
for tool in debootstrap rclone httpdirfs nbdkit nbdfuse nginx curl fusermount3 losetup sfdisk; do
    command -v "$tool" >/dev/null || { echo "setup-contenders: $tool still missing" >&2; exit 1; }
done
nbdkit --dump-plugin curl >/dev/null || { echo "setup-contenders: nbdkit has no curl plugin" >&2; exit 1; }
echo "setup-contenders: all contender tools are installed"
