"""The Linux kernel's ABI in one place: mountinfo, loop devices (losetup and their backing
files in sysfs), FIEMAP, statfs/syncfs, prctl, atomic file replacement, and running the
system's tools. Thin wrappers that turn C conventions into Python exceptions and return
plain data. It imports only the core modules (errors, options, ranges, stats): nothing of
trio, httpx or pyfuse3, and no other subpackage.
"""
