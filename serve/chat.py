"""Chat with a model in the terminal: `python serve/chat.py --model DIR [--adapter DIR]`.

Same as `mmllm chat ...`; `/help` inside lists the commands.
"""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
