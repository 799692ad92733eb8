"""A store's catalogue read from its directory, whatever its version: a version 3 one's host
parts checked against its top level and joined (as a mount reads them, without HTTP)."""

import hashlib
from pathlib import Path

from backupfs.store import manifest
from backupfs.store.manifest import Catalogue, HostIndex


def read_store_catalogue(root: Path) -> Catalogue:
    top = manifest.parse_store_catalogue((root / manifest.CATALOGUE_NAME).read_bytes())
    if not isinstance(top, HostIndex):
        return top
    assert not top.refused, top.refused
    snapshots = []
    for host in top.hosts:
        data = (root / host.path).read_bytes()
        assert len(data) == host.catalogue_size, host
        assert hashlib.sha256(data).hexdigest() == host.catalogue_sha256, host
        snapshots += manifest.parse_host_catalogue(data, host)
    return Catalogue(tuple(snapshots))
