#!/usr/bin/env bash
# Install everything backupfs, its demo and its tests need on Debian 12, as root: the Debian
# packages, then this clone into the system Python, editable (`pip install -e`, so a
# `git pull` takes effect at once), with the command linked into /usr/local/bin.
# Undo with: pip uninstall backupfs && rm /usr/local/bin/backupfs
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config gcc nginx-light curl util-linux e2fsprogs
          xfsprogs dosfstools mtools btrfs-progs fdisk gdisk acl attr systemd openssl
          qemu-utils ntfs-3g exfat-fuse exfatprogs lvm2)
APT_WHO=setup
# shellcheck source=contrib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
missing_packages "${packages[@]}"
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt_wait update -qq
    apt_wait install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "^WARNING: Running pip as the 'root' user" \
        -e "^\[notice\]" || true
python3 -c "import backupfs.cli.main, pyfuse3, trio, httpx, cachetools" \
    || { echo "setup: Python dependencies did not install" >&2; exit 1; }
# mount.fuse3 (mount -t fuse.backupfs, fstab, systemd) runs `backupfs` from the standard PATH.
script=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/backupfs
if [[ "$script" != /usr/local/bin/backupfs && "$script" != /usr/bin/backupfs ]]; then
    ln -sfn "$script" /usr/local/bin/backupfs
fi
