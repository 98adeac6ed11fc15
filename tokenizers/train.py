"""Train or fit a modality tokenizer: `python tokenizers/train.py --config configs/tokenizer/image_toy.yaml`.

Same as `mmllm tokenizer train`; trailing `key=value` arguments override the config
(`out=runs/image train.steps=500 data.source=/path/to/images`).
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenizer", "train", *sys.argv[1:]]))
