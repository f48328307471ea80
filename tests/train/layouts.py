"""`torchrun ... -m tests.train.layouts JOBS.json`: several training runs in one torchrun job,
one after another on one process group, since starting the processes costs more than a short
run. JOBS.json lists {"recipe": path, "set": ["section.key=value", ...], "resume_from": path}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from herd.config.train import load_config
from herd.train.trainer import Trainer


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        config = load_config(job["recipe"], job.get("set", []))
        # not Trainer.close(): it leaves the process group the next run joins
        Trainer(config, resume=job.get("resume_from") or False).fit()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
