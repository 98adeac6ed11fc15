"""Score a model: `python eval/run.py --model DIR --tasks toy-caption,toy-draw --out results.json`.

Same as `mmllm eval ...`; `--list` shows the registered tasks.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
