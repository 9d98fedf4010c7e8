"""Helper for tests/test_distributed.py (not a test file): joins the process group the way
the CLI stages do, then imports open_clip (as building a model does, lazily) and leaves the
group. Prints the gloo threads still alive afterwards: there must be none, or they outlive
Python's finalisation and can abort the process at exit."""

from __future__ import annotations

import os
import sys

import torch

from clipdistill.train.distributed import context_from_env, init_process_group, shutdown


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (Linux: /proc/self/task/*/comm)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as handle:
            names.append(handle.read().strip())
    return sorted(name for name in names if "gloo" in name)


if __name__ == "__main__":
    ctx = context_from_env()
    created = init_process_group(ctx, torch.device("cpu"), "gloo")
    import open_clip  # noqa: F401  (imports torch.distributed.nn, as model building does)

    during = gloo_threads()
    shutdown(created)
    # one write per line: two ranks share the pipe, and print's separate newline can interleave
    sys.stdout.write(f"rank {ctx.rank}: during={during} after={gloo_threads()}\n")
    sys.stdout.flush()
