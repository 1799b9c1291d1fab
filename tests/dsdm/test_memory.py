"""A fixed mmap threshold returns freed multi-MB buffers to the system; with glibc's dynamic
threshold, a loop that frees and re-allocates them keeps its RSS. Checked in fresh
interpreters, since the setting is process-wide."""

import platform
import subprocess
import sys

import pytest

LOOP = """
import sys
import numpy as np
from dsdm.memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
start = rss_mb()
kept = []
for i in range(40):
    big = np.ones((4096, 1000))       # 31 MiB: mapped, then raises glibc's threshold
    del big
    mid = np.ones((4096, 900)) * i    # 28 MiB: from the heap once the threshold has risen
    kept.append(np.ones(20_000))      # a little survives each round, pinning the heap
    del mid
print(rss_mb() - start)
"""


def _growth(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True,
                         check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_fixed_threshold_keeps_freed_buffers_out_of_rss() -> None:
    fixed = _growth("fixed")
    assert fixed < 20  # the 6 MB kept, not the freed buffers
    assert _growth("dynamic") > fixed + 20  # the dynamic threshold keeps them resident
