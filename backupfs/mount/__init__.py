"""The mount daemon: the tree of hosts, snapshots and disks (tree.py, pure data), the
view that gives its attributes and the hidden control directory (view.py, control.py),
the thin pyfuse3 adapter (fuse_ops.py), the plan server (plan_server.py), kernel tuning
(tuning.py), Prometheus metrics (metrics.py, metrics_export.py) and the daemon that
builds everything in one nursery (daemon.py). The only layer that imports pyfuse3 and
prometheus_client; it may import every layer below it (remote, readpath, store,
plan's channel, linux, core).
"""
