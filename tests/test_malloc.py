"""npsd/malloc.py: once npsd is imported, an array freed and allocated again reuses the heap's memory
instead of taking fresh pages from the kernel (each a page fault when first written).

The pattern is a forward pass's in small: two arrays of 1.2 MB alive at once, freed, allocated
again, 100 times. With glibc's defaults (NPSD_KEEP_MEMORY=0) that took 55,400 page faults, 554 per
round, every round; with npsd's thresholds 0. The bound, 1/100 of the default's count, fails if the
settings are not made or do not reach the arrays."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc malloc's")

CHILD = """
import json, resource
import numpy as np
import npsd
from npsd import malloc

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

counts = []
for _ in range(3):                       # the first round may grow the heap; the later ones must not
    before = faults()
    for _ in range(100):
        x = np.ones(300_000, np.float32)
        y = x * 2
        del x, y
    counts.append(faults() - before)
print(json.dumps({"kept": malloc.KEPT, "faults": counts[1:]}))
"""


def faults(keep):
    env = dict(os.environ, NPSD_KEEP_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_memory_is_reused_without_page_faults():
    default, kept = faults(keep=False), faults(keep=True)
    print(f"page faults per 100 rounds: glibc's defaults {default['faults']}, npsd's settings {kept['faults']}")
    assert kept["kept"] and not default["kept"]
    assert min(default["faults"]) > 100 * 100, "the pattern no longer makes glibc's defaults fault: the test shows nothing"
    assert max(kept["faults"]) <= min(default["faults"]) / 100
