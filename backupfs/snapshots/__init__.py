"""Questions asked of many snapshots at once, without attaching anything: `backupfs find`,
`log`, `diff` and `cat`. A session (session.py) opens the store in-process with the
mount's own read path (verified block fetches, the block cache, virtual disks), the
partition tables and filesystems are read in userspace (plan/parttable.py, ext4fs.py,
plan/xfsmeta.py), walks run level by level with many reads in flight (walk.py), and diff
compares the store's digests before it reads anything (diff.py). May import the core,
linux, store, remote, readpath, plan and mount's pure tree; uses trio.
"""
