"""Prepare a starting checkpoint: `python train/convert.py --from-hf SRC --layout LAYOUT --out DST`.

Same as `mmllm convert`: imports a local HF Llama/Qwen2/Mistral/Qwen3 dir, extends its
vocabulary to the layout, and writes a native checkpoint to pretrain or finetune from.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
