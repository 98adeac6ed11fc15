"""Export a checkpoint for HF-based serving stacks: `python serve/export_hf.py SRC --out DST`.

Same as `mmllm convert --to-hf SRC --out DST`; transformers (and engines that read HF dirs)
load the result, with every id of the unified vocabulary named in its tokenizer.
"""

import argparse
import sys

from mmllm.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="native mmllm checkpoint dir")
    parser.add_argument("--out", required=True, help="output HF dir")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    dtype = ["--dtype", args.dtype] if args.dtype else []
    sys.exit(main(["convert", "--to-hf", args.src, "--out", args.out, *dtype]))
