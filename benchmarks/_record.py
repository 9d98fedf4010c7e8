"""What every benchmark JSON opens with: which benchmark, when, and on what machine.

Imported by the scripts beside it (run as ``python benchmarks/NAME.py``, so this folder is on
``sys.path``); not a benchmark itself.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from typing import Any


def run_header(benchmark: str) -> dict[str, Any]:
    """``benchmark``, the UTC ``date`` to the second, and the ``machine`` it was measured on."""
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
