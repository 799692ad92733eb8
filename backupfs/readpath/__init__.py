"""The read path of the mount daemon: the byte-bounded block cache (cache.py), the
persistent disk cache and the source wrapped around HTTP that uses it (diskcache.py,
disksource.py), readahead decisions (readahead.py), read-plan bookkeeping (plans.py) and
the BlockReader that serves reads with one in-flight fetch per block (blocks.py). Its
state and invariants are written down in docs/readpath.md. It reads through the
RangeSource protocol (source.py), so it imports neither httpx nor pyfuse3: trio, the
core, linux and store only.
"""
