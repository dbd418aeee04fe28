"""Kill (SIGKILL) the first Ray worker process seen running a decoding task of `--engine ray` (Ray
names it ray::decode_range), print "KILLED <pid>", and end; give up after 240 s. Started in the
background beside a run, it shows that Ray runs the lost batch again (bench/ray_two_nodes.sh and
tests/test_ray_engine.py use it)."""

import os
import signal
import sys
import time

deadline = time.time() + 240
while time.time() < deadline:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::decode_range"):
                    os.kill(int(pid), signal.SIGKILL)
                    print("KILLED", pid, flush=True)
                    sys.exit(0)
        except OSError:
            pass
    time.sleep(0.005)
