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
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Another apt or dpkg run (unattended-upgrades, a second shell) may hold the lock: wait for
# it, up to two minutes, instead of failing at once.
apt_wait() {
    local out
    for _ in $(seq 60); do
        if out=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "$@" 2>&1); then
            return 0
        fi
        if grep -qE "Could not get lock|Unable to lock|is held by process" <<<"$out"; then
            echo "setup: waiting for another apt/dpkg run to finish"
            sleep 2
            continue
        fi
        echo "$out" >&2
        return 1
    done
    echo "setup: apt stayed locked for two minutes" >&2
    return 1
}
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
