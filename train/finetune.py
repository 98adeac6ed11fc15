"""Finetune with DeepSpeed (LoRA, full or QLoRA):

    deepspeed train/finetune.py --config configs/finetune/toy_lora.yaml [--deepspeed configs/deepspeed/zero2.json]

Also plain `python train/finetune.py ...` (one process) and `mmllm finetune ...`. The work is
`mmllm.training.finetune`; this script only hands it the command line.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
