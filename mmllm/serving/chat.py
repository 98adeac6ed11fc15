"""`mmllm chat`: talk to a model in a terminal, media in and out (also `python serve/chat.py`).

Each line is a message, or a command:

    /image PATH   /audio PATH   /video PATH     attach a file to the next message
    /action JSON                                attach an action chunk: [[dx, dy], ...] or a .json/.npy path
    /set KEY=VALUE                              temperature=0.7, image.top_k=100, guidance.image=3, ...
    /reset  /save FILE  /help  /quit

Ask for a medium in words ("draw a red circle", "say hello", "animate ...", "move to the blue
star"): the reply's media are saved as PNG / WAV / GIF / JSON and their paths printed, while
text streams as it forms. With stdin piped (not a terminal) the same lines are read without
prompts, so a chat can be scripted. A bad command or file prints one `error:` line and the
chat goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from mmllm.data.media import check_actions, read_media
from mmllm.errors import MMLLMError
from mmllm.generation.streaming import TextStream
from mmllm.serving.session import ChatSession

PROMPT = "you> "
REPLY = "assistant> "
MEDIA_COMMANDS = ("/image", "/audio", "/video", "/action")
HELP = """\
/image PATH   /audio PATH   /video PATH     attach a file to the next message
/action JSON                                attach an action chunk: [[dx, dy], ...] or a .json/.npy path
/set KEY=VALUE                              temperature=0.7, image.top_k=100, guidance.image=3, max_new_tokens=256
/reset  /save FILE  /help  /quit
Ask for media in words: "draw ...", "say ...", "animate ...", "move to ..."."""


def run_chat(model, args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    session = ChatSession(model, Path(args.media_dir))
    session.settings.max_new_tokens = args.max_new_tokens
    session.settings.seed = args.seed
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"mmllm chat: {', '.join(session.generator.generatable) or 'text'} out; /help for commands\n")
    while True:
        if interactive:
            stdout.write(PROMPT)
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line, stdout):
                    break
                continue
            stdout.write(REPLY)
            stream = TextStream(model.layout, model.text_tokenizer, stdout)
            reply = session.ask(line, on_token=stream)
            stream.close()
            media = [p for p in reply.parts if p.kind != "text" and p.media is not None]
            for part, path in zip(media, reply.files, strict=True):
                stdout.write(f"[{part.kind} saved to {path}]{f' ({part.flag})' if part.flag else ''}\n")
        except MMLLMError as err:
            stdout.write(f"error: {err}\n")
        stdout.flush()


def _command(session: ChatSession, line: str, stdout: TextIO) -> bool:
    """Run one slash command; False to end the chat."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        stdout.write(HELP + "\n")
    elif name == "/reset":
        session.reset()
        stdout.write("conversation cleared\n")
    elif name == "/save":
        if not rest:
            raise MMLLMError("/save needs a file name")
        session.save(Path(rest))
        stdout.write(f"saved to {rest}\n")
    elif name == "/set":
        stdout.write(session.set(rest) + "\n")
    elif name in MEDIA_COMMANDS:
        modality = name[1:]
        if not rest:
            raise MMLLMError(f"{name} needs a {'JSON chunk or a path' if modality == 'action' else 'path'}")
        session.attach(modality, _load(modality, rest), rest)
        stdout.write(f"attached {modality} {rest if len(rest) < 60 else rest[:57] + '...'}\n")
    else:
        raise MMLLMError(f"unknown command {name} (/help lists them)")
    return True


def _load(modality: str, argument: str) -> np.ndarray:
    if modality == "action" and argument.startswith("["):
        try:
            return check_actions(json.loads(argument), "/action")
        except json.JSONDecodeError as err:
            raise MMLLMError(f"/action: not JSON ({err.msg} at column {err.colno})") from None
    return read_media(modality, argument)
