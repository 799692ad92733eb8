"""The store's format and what describes it: the catalogue and per-snapshot metadata
(manifest.py), the indexer that writes them next to the images (indexer.py), and an
image as the read path sees it (image.py). Later the disk formats (qcow2, VMDK, VHD) and
store backends live here too. Pure data and local files: it imports the core and linux
only; no trio, no HTTP, no FUSE.
"""
