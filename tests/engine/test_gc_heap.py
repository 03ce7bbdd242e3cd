"""freeze_startup_heap (engine/gc_heap.py), run in a child process: freezing is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = """
import gc, json, weakref
from jaxserve.engine.gc_heap import freeze_startup_heap
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle alive at startup
count = freeze_startup_heap()
frozen = gc.get_freeze_count()
alive = weakref.ref(a)
del a, b
gc.collect()  # the collector does not walk frozen objects: it cannot find this cycle
print(json.dumps([count, frozen, alive() is not None]))
"""


def _run(env: dict[str, str]) -> list:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_startup_objects_leave_the_collectors_walks():
    count, frozen, skipped = _run({})
    assert count == frozen > 1000  # the interpreter's and jaxserve's own objects, at least
    assert skipped  # (what freezing is for; only garbage cycles made at startup pay for it)
    count, frozen, skipped = _run({"JAXSERVE_GC_FREEZE": "0"})
    assert count == frozen == 0 and not skipped
