"""Walking a filesystem read in userspace: level by level, the directories of one level
listed in parallel (each listing and its inodes are reads through the store), and path
lookups that touch only the directories on the way."""

import concurrent.futures
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from backupfs.plan.fsmeta import FileInfo, FsError, FsReader

WORKERS = 16  # directories listed at once: reads in flight
MAX_ENTRIES = 10_000_000  # per walk: a crafted filesystem cannot make it endless


@dataclass(frozen=True)
class Found:
    path: str  # absolute inside the filesystem: "/etc/nginx/nginx.conf"
    info: FileInfo


def _join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"


def _children(fs: FsReader, parent: Found) -> list[Found]:
    return [Found(_join(parent.path, name), fs.inode(number))
            for name, number in fs.entries(parent.info)]  # fmt: skip


def lookup(fs: FsReader, path: str) -> FileInfo | None:
    """The inode at `path`, or None; reads only the directories on the way."""
    info = fs.inode(fs.root)
    for name in [p for p in path.split("/") if p]:
        if not info.is_dir:
            return None
        number = dict(fs.entries(info)).get(name)
        if number is None:
            return None
        info = fs.inode(number)
    return info


def walk(fs: FsReader, top: str = "/") -> Iterator[Found]:
    """`top` and everything below it, level by level (each directory once: a directory
    reached twice, a crafted loop, is refused)."""
    info = lookup(fs, top)
    if info is None:
        return
    start = Found("/" + top.strip("/") if top.strip("/") else "/", info)
    yield start
    level, seen, count = [start] if info.is_dir else [], {info.number}, 0
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        while level:
            following = []
            for children in pool.map(lambda d: _children(fs, d), level):
                for child in children:
                    count += 1
                    if count > MAX_ENTRIES:
                        raise FsError(f"more than {MAX_ENTRIES} entries")
                    yield child
                    if child.info.is_dir:
                        if child.info.number in seen:
                            raise FsError(f"directory inode {child.info.number} reached twice")
                        seen.add(child.info.number)
                        following.append(child)
            level = following


def matches(pattern: str, path: str) -> bool:
    """A glob over whole path components: `*`, `?` and `[...]` stay within one component,
    `**` spans any number. A pattern without `/` matches the last component (as `find
    -name`)."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return _match(pattern.strip("/").split("/"), path.strip("/").split("/"))


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    if not parts or not fnmatch.fnmatchcase(parts[0], pattern[0]):
        return False
    return _match(pattern[1:], parts[1:])
