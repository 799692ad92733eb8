"""`backupfs restore` and `flush`: the walk of what will be copied, spread over the loop
clones (walk.py), DEST checks and the run as a whole (run.py), the reader/writer pipeline
(pipeline.py), its metadata read plan (prefetch.py), options, counters and progress
(outcome.py), DEST reached through directory descriptors that follow no symlink
(desttree.py), copying one file with its metadata (copying.py), its data with the
kernel's copies (fastcopy.py), a large file in pieces over several readers (pieces.py),
and making the result durable with one syncfs per filesystem (durability.py). Blocking
code with threads: no trio, no HTTP, no FUSE; it imports the core, linux, attach and
plan.
"""
