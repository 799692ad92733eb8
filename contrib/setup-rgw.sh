#!/usr/bin/env bash
# Install Debian's Ceph RADOS Gateway and the daemons it needs (a monitor and an OSD), as
# root, for the tests and benchmarks that run a real S3 server (tests/support/rgw.py). Only
# the packages: no cluster is made and no service is started or enabled here.
set -euo pipefail

packages=(radosgw ceph-mon ceph-osd ceph-common)
APT_WHO=setup-rgw
# shellcheck source=contrib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
missing_packages "${packages[@]}"
((${#missing[@]})) || exit 0

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
