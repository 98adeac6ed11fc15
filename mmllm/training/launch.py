"""Multi-rank processes: start an `mmllm` command on N local ranks, and end a rank cleanly.

The demo (and any pipeline that trains as one of its stages) uses `launch_ranks` instead of
asking the user to type `deepspeed ...`: the launcher runs `python -m mmllm ARGS` once per rank
with RANK / LOCAL_RANK / WORLD_SIZE set, which `mmllm.training.loop.setup_distributed` reads.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mmllm.errors import MMLLMError

LOG_TAIL_LINES = 30  # enough to show a rank's traceback in the error


def launch_ranks(mmllm_args: list[str], ranks: int, log: Path) -> None:
    """Run `mmllm MMLLM_ARGS` on `ranks` local processes; their output goes to `log`.

    On CPU each rank gets one intra-op thread (DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1), so two
    ranks share a 2-core machine without oversubscription. Raises with the log's tail if any
    rank fails.
    """
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    command += ["--master_port", str(free_port()), "--no_local_rank", "--module", "mmllm", *mmllm_args]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        code = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise MMLLMError(f"`mmllm {' '.join(mmllm_args)}` on {ranks} ranks failed (exit {code}); see {log}:\n{tail}")


def end_rank(code: int = 0) -> None:
    """End a rank of a multi-rank run that has finished its work: flush, then exit at once.

    Interpreter finalization after a CPU (gloo) run sometimes aborts a rank with "terminate
    called without an active exception": a C++ thread is destroyed while joinable, after every
    file is written and every collective is done, and the launcher then reports the whole run
    as failed. Skipping finalization (`os._exit`) avoids that; nothing is lost because the
    caller has saved, synchronised and destroyed its process group. A single process (no
    launcher, or WORLD_SIZE=1) returns and exits normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
