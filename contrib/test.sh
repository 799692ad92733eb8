#!/usr/bin/env bash
# Set up, lint, type-check and run the whole test suite (real nginx, FUSE and loop devices).
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
bash contrib/setup-rgw.sh
ruff check backupfs tests bench
mypy
exec python3 -m pytest -q -p no:cacheprovider "$@"
