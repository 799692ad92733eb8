#!/usr/bin/env bash
# backupfs on a built-in example: a server's partitioned disk image is put in a store, served
# by nginx, mounted over HTTP, its filesystems opened read-only, and a directory restored and
# verified.
# Everything lives in a temporary directory and is undone on exit, on failure too.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/contrib/setup.sh"

backupfs() { python3 -m backupfs "$@"; }
if [[ -t 1 ]]; then step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }; else step() { printf '\n== %s\n' "$*"; }; fi
work=$(mktemp -d /tmp/backupfs-demo.XXXXXX)
nginx_pid=""
cleanup() {
    set +e
    backupfs detach "$work/restore" >/dev/null 2>&1
    mountpoint -q "$work/backups" && backupfs umount "$work/backups"
    [ -n "$nginx_pid" ] && kill "$nginx_pid" && wait "$nginx_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

step "A server's disk, backed up as an image in a store: GPT, /boot (p1) and / (p2), ext4"
src=$work/web01-root boot=$work/web01-boot
disk=$work/store/web01/2026-11-20T0300Z/disk0.img
mkdir -p "$src/etc/nginx/sites-enabled" "$src/var/www/html" "$boot/grub" "$(dirname "$disk")"
printf 'server {\n    listen 443 ssl;\n    server_name www.example.com;\n}\n' \
    > "$src/etc/nginx/sites-enabled/www"
head -c 20M /dev/urandom > "$src/var/www/html/video.bin"
echo "<h1>hello from last week</h1>" > "$src/var/www/html/index.html"
echo "set default=0" > "$boot/grub/grub.cfg"
mkfs.ext4 -q -L web01-boot -d "$boot" "$work/p1.img" 16M
mkfs.ext4 -q -L web01-root -d "$src" "$work/p2.img" 96M
truncate -s 114M "$disk"  # 1 MiB for the table, 16 + 96 MiB, 1 MiB for GPT's backup copy
printf 'label: gpt\nstart=2048, size=32768, name=boot\nstart=34816, size=196608, name=root\n' \
    | sfdisk --quiet "$disk"
dd if="$work/p1.img" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/p2.img" of="$disk" bs=1M seek=17 conv=notrunc,sparse status=none
rm "$work/p1.img" "$work/p2.img"
sfdisk --list "$disk" | tail -n 3
backupfs index "$work/store"

step "Serving the store with nginx (contrib/nginx-store.conf)"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -e "s|@LISTEN@|127.0.0.1:$port|" -e "s|@ROOT@|$work/store|" \
    "$here/contrib/nginx-store.conf" > "$work/site.conf"
cat > "$work/nginx.conf" <<CONF
daemon off; master_process off; user root; pid $work/nginx.pid;
error_log $work/nginx-error.log;
events {}
http { access_log off; client_body_temp_path $work/tmp; include $work/site.conf; }
CONF
nginx -p "$work" -c "$work/nginx.conf" -e "$work/nginx-error.log" &
nginx_pid=$!
url="http://127.0.0.1:$port/"
curl -s --retry 20 --retry-connrefused --retry-delay 0 -o /dev/null "$url"
echo "store at $url"

step "backupfs ls $url"
backupfs ls "$url"

step "backupfs mount $url $work/backups"
mkdir "$work/backups"
backupfs mount "$url" "$work/backups"
ls -l "$work/backups/web01/2026-11-20T0300Z/"

step "backupfs attach …/disk0.img $work/restore"
backupfs attach "$work/backups/web01/2026-11-20T0300Z/disk0.img" "$work/restore"
ls "$work/restore"
grep -rn 'listen 443' "$work/restore/p2/etc/nginx"
cat "$work/restore/p1/grub/grub.cfg"

step "backupfs restore …/p2/var/www/html $work/restored"
backupfs restore "$work/restore/p2/var/www/html" "$work/restored"
(cd "$src/var/www/html" && sha256sum -- *) > "$work/expected.sha256"
(cd "$work/restored" && sha256sum -c "$work/expected.sha256")

step "Cleaning up: backupfs detach, backupfs umount"
backupfs detach "$work/restore"
backupfs umount "$work/backups"
echo "demo OK: the restored files match the originals byte for byte"
