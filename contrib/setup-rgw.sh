#!/usr/bin/env bash
# Install Debian's Ceph RADOS Gateway and the daemons it needs (a monitor and an OSD), as
# root, for the tests and benchmarks that run a real S3 server (tests/support/rgw.py). Only
# the packages: no cluster is made and no service is started or enabled here.
set -euo pipefail

packages=(radosgw ceph-mon ceph-osd ceph-common)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0

# Another apt or dpkg run (unattended-upgrades, contrib/setup.sh in a second shell) may hold
# the lock: wait for it, up to two minutes, instead of failing at once.
apt_wait() {
    local out
    for _ in $(seq 60); do
        if out=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "$@" 2>&1); then
            return 0
        fi
        if grep -qE "Could not get lock|Unable to lock|is held by process" <<<"$out"; then
            echo "setup-rgw: waiting for another apt/dpkg run to finish"
            sleep 2
            continue
        fi
        echo "$out" >&2
        return 1
    done
    echo "setup-rgw: apt stayed locked for two minutes" >&2
    return 1
}
echo "setup-rgw: installing ${missing[*]}"
apt_wait update -qq
# The packages' own units (ceph-crash, the ceph-*.target) must not start daemons of the
# distribution's defaults: policy-rc.d refuses service starts while apt runs (removed again
# afterwards, unless it was someone else's).
policy=/usr/sbin/policy-rc.d
ours=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
fi
trap 'if ((ours)); then rm -f "$policy"; fi' EXIT
apt_wait install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v radosgw >/dev/null || { echo "setup-rgw: radosgw did not install" >&2; exit 1; }
