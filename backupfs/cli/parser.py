"""The commands, their arguments and their help."""

import argparse

from backupfs import __version__
from backupfs.cli import disk_commands, history_commands, store_commands
from backupfs.options import option_help
from backupfs.store.indexer import DEFAULT_BLOCK_SIZE

NO_INDEX_HELP = (
    "a store never indexed: find HOST/SNAPSHOT/FILE in its directory or bucket listing; "
    "blocks are not digest-verified"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backupfs", description="Browse and restore files from disk-image backups over HTTP."
    )
    parser.add_argument("--version", action="version", version=f"backupfs {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an internal error"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "index", help="write store metadata for the disk images in STORE/<host>/<snapshot>/"
    )
    p.add_argument(
        "store",
        metavar="STORE",
        help="the store: a directory or s3://bucket/prefix/, holding <host>/<snapshot>/<disk> "
        "(raw .img, qcow2, VMDK, VHD, VHDX)",
    )
    p.add_argument(
        "-o",
        action="append",
        default=[],
        metavar="OPT,...",
        help="for s3://: options as for mount (endpoint=, region=, credentials_file=, "
        "connections=, ...)",
    )
    p.add_argument(
        "--map-parent",
        action="append",
        default=[],
        metavar="FROM=TO",
        help="a parent path that starts with FROM (as written in an image, e.g. "
        "/var/lib/libvirt/images/) is looked up under TO, a directory of the store "
        "(e.g. web01/2026-11-01T0300Z); may be repeated",
    )
    p.add_argument(
        "--block-size",
        default=str(DEFAULT_BLOCK_SIZE),
        help="digest block size for newly hashed images (default 64K)",
    )
    p.set_defaults(func=store_commands.cmd_index)

    p = sub.add_parser("ls", help="list hosts, snapshots and disks of a store")
    p.add_argument("url", metavar="URL", help="the store, http(s)://host/path/ or s3://bucket/prefix/")
    p.add_argument("host", metavar="HOST", nargs="?", help="list this host only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-index", action="store_true", help=NO_INDEX_HELP)
    p.add_argument(
        "-o",
        action="append",
        default=[],
        metavar="OPT,...",
        help="options as for mount (token_file=, timeout=, ...)",
    )
    p.set_defaults(func=store_commands.cmd_ls)

    p = sub.add_parser(
        "mount",
        help="mount a store as a read-only tree of disk images",
        epilog=option_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", metavar="URL", help="the store, http(s)://host/path/ or s3://bucket/prefix/")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount it on")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--no-index", action="store_true", help=NO_INDEX_HELP + " (-o no_index)")
    p.add_argument("-o", action="append", default=[], metavar="OPT,...", help="mount options")
    p.set_defaults(func=store_commands.cmd_mount)

    _add_history_commands(sub)

    p = sub.add_parser("attach", help="open a disk image's filesystems read-only at TARGET/p<K>")
    p.add_argument(
        "image",
        metavar="IMAGE",
        help="a disk image, usually MNT/<host>/<snapshot>/<disk>.img of a backupfs mount",
    )
    p.add_argument(
        "target",
        metavar="TARGET",
        help="where its filesystems appear, as TARGET/p<K> (made if absent, else must be empty)",
    )
    p.add_argument(
        "--clones",
        type=int,
        default=4,
        help="loop devices per partition, for parallel readers (default 4)",
    )
    p.add_argument("--partition", type=int, metavar="K", help="attach only partition K")
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="let paths follow symlinks inside the backup (default: nosymfollow)",
    )
    p.add_argument("--direct-io", action="store_true", help="loop devices with direct I/O")
    p.add_argument(
        "--share",
        action="store_true",
        help="let other users read the backup's files: TARGET 0755 (default 0700, owner only)",
    )
    p.set_defaults(func=disk_commands.cmd_attach)

    p = sub.add_parser("detach", help="undo an attach (also after a crashed attach)")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="a TARGET given to attach")
    p.set_defaults(func=disk_commands.cmd_detach)

    p = sub.add_parser("status", help="list attachments")
    p.add_argument("--json", action="store_true", help="the attachments as JSON")
    p.set_defaults(func=disk_commands.cmd_status)

    p = sub.add_parser("restore", help="copy files out of a backup durably, in parallel")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="what to restore: a directory, or files, inside an attachment (or anywhere)",
    )
    p.add_argument("dest", metavar="DEST", help="where to restore it: a directory (made if absent)")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="parallel readers (default: 4, or one per loop clone if more)",
    )
    p.add_argument("--no-flush", action="store_true", help="skip the final syncfs")
    p.add_argument(
        "--files-from",
        metavar="FILE",
        help="restore the paths listed in FILE (relative to the one SRC; - for stdin) "
        "at the same relative paths under DEST",
    )
    p.add_argument(
        "--no-plan",
        action="store_true",
        help="no read plans: neither the metadata walk nor the data plan (plain readahead)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="restore into a non-empty DEST, replacing every file",
    )
    group.add_argument(
        "--skip-existing",
        action="store_true",
        help="restore into a non-empty DEST, leaving existing names alone",
    )
    p.add_argument(
        "--no-special",
        action="store_true",
        help="for untrusted backups: drop setuid/setgid bits and file capabilities, "
        "skip device nodes (each one is listed)",
    )
    p.add_argument("--json", action="store_true", help="a JSON summary on stdout")
    p.set_defaults(func=disk_commands.cmd_restore)

    p = sub.add_parser("warm", help="fetch the data under PATH (in an attachment) into the cache")
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="a file or directory inside an attachment"
    )
    p.add_argument(
        "--metadata",
        action="store_true",
        help="only directories and inodes (before ls -lR, find, du), not file contents",
    )
    p.set_defaults(func=disk_commands.cmd_warm)

    p = sub.add_parser("flush", help="make files under PATH durable (after cp or rsync)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a restored file or directory")
    p.set_defaults(func=disk_commands.cmd_flush)

    p = sub.add_parser("umount", help="unmount a backupfs mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where a backupfs store is mounted")
    p.add_argument(
        "-l",
        "--lazy",
        action="store_true",
        help="detach now, free when the last open file closes (umount -l)",
    )
    p.set_defaults(func=store_commands.cmd_umount)

    p = sub.add_parser("stats", help="show a mount's counters (MOUNTPOINT/.backupfs/stats)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where a backupfs store is mounted")
    p.add_argument("--json", action="store_true", help="the raw JSON document")
    p.set_defaults(func=store_commands.cmd_stats)
    return parser


def _history_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="http(s)://host/path/ or s3://bucket/prefix/")
    p.add_argument("--stats", action="store_true", help="say how many bytes were fetched")
    p.add_argument("-o", action="append", default=[], metavar="OPT,...",
                   help="options as for mount (token_file=, endpoint=, ...)")  # fmt: skip


def _add_history_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """find, log, diff, cat: across snapshots, read in userspace (ext2/3/4, xfs)."""
    p = sub.add_parser("find", help="every file matching a pattern, in every snapshot of a host")
    _history_common(p)
    p.add_argument("snapshots", metavar="HOST[/SNAPSHOT]")
    p.add_argument("pattern", metavar="PATTERN",
                   help="a glob: with a /, over the whole path (** spans directories); "
                   "else over the name, as find -name")  # fmt: skip
    p.add_argument("--hash", action="store_true", help="add each file's SHA-256 (reads it)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=history_commands.cmd_find)

    p = sub.add_parser("log", help="the distinct versions of one path across a host's snapshots")
    _history_common(p)
    p.add_argument("host", metavar="HOST[/SNAPSHOT]")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--hash", action="store_true",
                   help="tell versions by content (SHA-256), not size, mtime and mode")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=history_commands.cmd_log)

    p = sub.add_parser("diff", help="what changed between two snapshots of a host (+ - M T U)")
    _history_common(p)
    p.add_argument("first", metavar="HOST/SNAPSHOT")
    p.add_argument("second", metavar="HOST/SNAPSHOT")
    p.add_argument("--path", default="/", help="compare below this directory only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=history_commands.cmd_diff)

    p = sub.add_parser("cat", help="one file of a snapshot to standard output")
    _history_common(p)
    p.add_argument("spec", metavar="HOST/SNAPSHOT/DISK[:pN]:/PATH")
    p.set_defaults(func=history_commands.cmd_cat)
