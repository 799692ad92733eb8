"""Hold all but KEEP_MIB of the machine's available memory until killed (first in line
for the OOM killer). Prints the number of bytes held once they are all touched."""

import sys
import time

keep = int(sys.argv[1]) << 20
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")
with open("/proc/meminfo") as f:
    available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
size = max(available - keep, 0)
buf = bytearray(size)
buf[::4096] = b"x" * len(range(0, size, 4096))  # touch every page
print(size, flush=True)
time.sleep(3600)
