"""Virtual disk formats (qcow2, VMDK, VHD, VHDX): each a table reader that maps ranges of
the guest's disk to ranges of stored files, to zeros, or to the parent image. Sans-I/O:
a layer says which bytes of its files it needs (`TableRead`), is given them, and answers
with `Extent`s; the index (local files, `local.py`) and the mount (verified blocks over
HTTP) drive the same code. Part of the store layer: no trio, no HTTP, no FUSE.
"""
