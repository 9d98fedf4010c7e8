"""Helper for tests/test_distributed.py (not a test file): ``python -m clipdistill.train`` with
every process stopping before its second step, as a killed job would; rank 0 has saved the
step-1 checkpoint (``save_every: 1``)."""

from __future__ import annotations

from typing import Any

from clipdistill.train.__main__ import main
from clipdistill.train.trainer import Trainer

original = Trainer.train_step


def stop_before_second_step(self: Trainer, *args: Any, **kwargs: Any) -> dict[str, float]:
    if self.global_step == 1:
        raise SystemExit(3)
    return original(self, *args, **kwargs)


Trainer.train_step = stop_before_second_step  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
