"""Score a tokenizer's round trip: `python tokenizers/evaluate.py --tokenizer DIR [--data FOLDER]`.

Same as `mmllm tokenizer evaluate`: reconstruction quality, codebook usage and toy-world
oracle agreement.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenizer", "evaluate", *sys.argv[1:]]))
