"""Opening a disk image's filesystems: partition tables read in userspace
(partitions.py), which filesystem types the kernel mounts and with which options
(fstypes.py), the journal of what an attachment set up (state.py, with `locate` for
"which attachment and clone holds this path") and attach/detach/describe
(lifecycle.py). Blocking code run by the CLI: no trio, no HTTP, no FUSE; it imports
the core and linux only.
"""
