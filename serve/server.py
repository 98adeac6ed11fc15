"""Serve a model over an OpenAI-compatible HTTP API: `python serve/server.py --model DIR --port 8000`.

Same as `mmllm serve ...`; `--help` lists the limits and `--allow-local-media`.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
