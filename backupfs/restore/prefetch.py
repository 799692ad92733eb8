"""Restore's metadata read plan: the directories and inodes its walk will read, fetched
ahead (plan/metaprefetch.py), and the whole-tree data plan started from them."""

import logging
import os
import threading

from backupfs.plan import metaprefetch, readplan

log = logging.getLogger(__name__)


class MetadataPrefetch:
    """The directories and inodes restore's walk will read, fetched in parallel rounds
    (ext2/3/4, readplan.prefetch_metadata). A whole tree is read beside the walk, and
    its data plan starts as soon as the inodes are known, while the walk still runs; a
    --files-from list is read before the walk, which then reads no more than it needs."""

    def __init__(self, sources: list[str], listed: list[str] | None, dest: str) -> None:
        self.dirs = [s for s in sources if os.path.isdir(s) and not os.path.islink(s)]
        self.sel = None if listed is None else metaprefetch.selection(listed)
        # A fresh whole-tree restore copies every file the walk finds, in inode order.
        try:
            fresh = not os.path.lexists(dest) or not any(os.scandir(dest))
        except OSError:  # not a directory, not readable: _check_dest says so
            fresh = False
        self.early = listed is None and len(sources) == 1 and len(self.dirs) == 1 and fresh
        self.plan: readplan.RestorePlan | None = None
        self.known = readplan.KnownExtents()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if self.sel is not None:
            self._run()
        elif self.dirs:
            self.thread.start()

    def _run(self) -> None:
        for source in self.dirs:
            try:
                walked = readplan.prefetch_metadata(source, self.sel, self.known)
            except OSError as exc:  # the walk reports it
                log.debug("no metadata prefetch for %s: %s", source, exc)
                continue
            if self.early and walked is not None and not walked.errors:
                self.plan = readplan.start_tree_plan(source, walked, self.known)

    def join(self) -> readplan.RestorePlan | None:
        """The data plan started early, if any (the caller closes it)."""
        if self.thread.ident is not None:
            self.thread.join()
        return self.plan
