"""`python -m tests.train.dying_rank pretrain ...`: herd's CLI, except that rank 1 fails during
step 7 the first time (a marker file, HERD_TEST_DIE_MARKER, remembers): it SIGKILLs itself,
or with HERD_TEST_FAILURE=bug raises an ordinary RuntimeError, as a bug in the code would."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from herd.cli.main import app
from herd.train.trainer import Trainer

_train_step = Trainer.train_step


def dying_train_step(self: Trainer):
    marker = Path(os.environ["HERD_TEST_DIE_MARKER"])
    if self.step == 6 and os.environ.get("RANK") == "1" and not marker.exists():
        marker.write_text("rank 1 fails\n")
        if os.environ.get("HERD_TEST_FAILURE") == "bug":
            raise RuntimeError("shapes (3, 4) and (5, 6) do not match: a bug in step 7")
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(self)


Trainer.train_step = dying_train_step

if __name__ == "__main__":
    app()
