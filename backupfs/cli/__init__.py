"""The command line: `backupfs COMMAND ...` (and `backupfs URL MNT -o ...` as mount.fuse3 runs it).

`main.py` parses and turns failures into one line and an exit code (backupfs.errors lists
the codes); `parser.py` declares the commands; `store_commands.py` and `disk_commands.py`
run them; `format.py` prints sizes and counters. It may import every other subpackage,
but only inside the command that needs it: trio, httpx and pyfuse3 are imported by the
commands that use them (attach, restore and the others start in half the time).
"""
