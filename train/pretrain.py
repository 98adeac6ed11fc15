"""Pretrain with DeepSpeed:

    deepspeed train/pretrain.py --config configs/pretrain/toy.yaml [--deepspeed configs/deepspeed/zero2.json]

Also plain `python train/pretrain.py ...` (one process) and `mmllm pretrain ...`. The loop is
`mmllm.training.loop`; this script only hands it the command line.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
