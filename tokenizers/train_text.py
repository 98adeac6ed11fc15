"""Train the text tokenizer: `python tokenizers/train_text.py --input corpus.txt --out DIR`.

Same as `mmllm vocab train-text`. This folder holds scripts, not a package: a package named
`tokenizers` would shadow Hugging Face's `tokenizers`.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["vocab", "train-text", *sys.argv[1:]]))
