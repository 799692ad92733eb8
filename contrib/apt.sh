# Shared by contrib/setup.sh and contrib/setup-rgw.sh (sourced): the Debian packages of
# "$@" that are not installed yet go into the array `missing`, and `apt_wait` runs apt-get,
# waiting up to two minutes for another apt or dpkg run (unattended-upgrades, a second
# shell) to release its lock instead of failing at once. APT_WHO names the caller.

missing_packages() {
    missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
}

apt_wait() {
    local out
    for _ in $(seq 60); do
        if out=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "$@" 2>&1); then
            return 0
        fi
        if grep -qE "Could not get lock|Unable to lock|is held by process" <<<"$out"; then
            echo "${APT_WHO:-setup}: waiting for another apt/dpkg run to finish"
            sleep 2
            continue
        fi
        echo "$out" >&2
        return 1
    done
    echo "${APT_WHO:-setup}: apt stayed locked for two minutes" >&2
    return 1
}
