"""Read plans, the client side: the channel's wire format shared with the daemon
(channel.py), mapping files of an attachment to image ranges (readplan.py, extents.py),
and the userspace ext2/3/4 reader and metadata walk that fetch a tree's directories
and inodes in parallel rounds (ext4meta.py, metaprefetch.py). Blocking code with
threads: no trio, no HTTP, no FUSE; it imports the core, linux and attach.
"""
