"""`mmllm serve` (also `python serve/server.py`): the OpenAI-compatible API over one checkpoint.

    mmllm serve --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]

It binds to 127.0.0.1 unless told otherwise: the API has no authentication, so exposing it is
a decision for whoever runs it (`--host 0.0.0.0`, behind a proxy that authenticates).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mmllm.serving.schema import ServerLimits

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` options: the model, where to listen, and the request limits."""
    from mmllm.cli import add_model_arguments

    defaults = ServerLimits()
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the model id clients send (default: the --model dir's name)")
    parser.add_argument(
        "--allow-local-media",
        action="store_true",
        help="let requests name local files (file:// URLs or paths) as media; remote URLs are always refused",
    )
    parser.add_argument(
        "--text-replies",
        action="store_true",
        help="reply in text only unless a request's modalities or mmllm.reply_modality asks for media, as OpenAI "
        "does (for eval harnesses: a question with 'picture of' or 'say' in it is not a request to draw or speak)",
    )
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="most new tokens per request")
    parser.add_argument(
        "--max-body-mb", type=float, default=defaults.max_body_bytes / MIB, help="largest request body, in MiB"
    )
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="requests decoded as one batch")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 429s")


def run_serve(args: argparse.Namespace) -> None:
    """Load the model (with --adapter merged) and serve it with uvicorn until interrupted."""
    import uvicorn

    from mmllm.cli import load_model
    from mmllm.errors import ConfigError
    from mmllm.serving.app import create_app

    if args.max_tokens < 1 or args.max_batch < 1 or args.max_queue < 1 or args.max_body_mb <= 0:
        raise ConfigError("--max-tokens, --max-batch, --max-queue and --max-body-mb must be positive")
    limits = ServerLimits(
        max_tokens=args.max_tokens,
        default_max_tokens=min(ServerLimits.default_max_tokens, args.max_tokens),
        max_body_bytes=int(args.max_body_mb * MIB),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
    )
    model = load_model(args)
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(
        model, limits, model_name=name, allow_local_media=args.allow_local_media, text_replies=args.text_replies
    )
    logger.info("serving %s as %r on http://%s:%d/v1", args.model, name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
