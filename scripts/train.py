#!/usr/bin/env python
"""Train a referring video-LLM: ``python scripts/train.py --config CFG [key=value ...]``.

Also under ``accelerate launch [--config_file configs/accelerate/ddp.yaml] scripts/train.py ...`` and
``torchrun --nproc_per_node N scripts/train.py ...``. Same as ``refvllm train``; see docs/training.md.
"""

import sys

from refvllm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("refvllm.train.loop", sys.argv[1:]))
