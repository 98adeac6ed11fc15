"""`mmllm serve` as a child process, for the demo's check and `mmllm bench serve`.

    with served(model_dir, log, name="demo") as base_url:
        client = OpenAI(base_url=base_url, api_key="unused")

The server listens on a free local port; the context waits for `/health` (or for the child to
die, which is reported with its log) and stops the server on the way out.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmllm.errors import MMLLMError
from mmllm.training.launch import free_port

STARTUP_SECONDS = 120  # importing torch and FastAPI and loading the model: ~5 s quiet, more when busy
STOP_SECONDS = 30  # a clean shutdown finishes the request in flight


@contextmanager
def served(model_dir: Path, log: Path, name: str, *flags: str) -> Iterator[str]:
    """Run `mmllm serve --model model_dir --model-name name *flags`; yields its /v1 base URL."""
    port = free_port()
    command = [sys.executable, "-m", "mmllm", "serve", "--model", str(model_dir), "--port", str(port)]
    command += ["--model-name", name, "--device", "cpu", *flags]
    with Path(log).open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_for_health(server, port, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_for_health(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise MMLLMError(f"`mmllm serve` exited with {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):  # the port is not open yet
            time.sleep(0.2)
    raise MMLLMError(f"`mmllm serve` did not answer /health in {STARTUP_SECONDS} s; see {log}")
