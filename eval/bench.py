"""Run a benchmark: `python eval/bench.py model --config configs/model/toy.yaml`.

Same as `mmllm bench ...`; each benchmark compares against its named baseline in one run.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
