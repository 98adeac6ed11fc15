"""`mmllm bench serve`: requests per second of `mmllm serve`, concurrent against one at a time.

A real server process on the checkpoint; the official openai client sends `requests` different
greedy chat requests of `tokens` new tokens each, first one after another, then all at once
from as many threads (the server batches compatible requests). Repeats alternate the two
orders, and the concurrent replies must equal the sequential ones, so the batching is checked
to change only the speed.
"""

from __future__ import annotations

import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmllm.data.toyworld import caption_corpus
from mmllm.errors import MMLLMError
from mmllm.serving.process import served

SERVED_NAME = "bench"


def bench_serve(model_dir: Path, requests: int, tokens: int, repeats: int, log: Path) -> dict:
    from openai import OpenAI

    flags = ("--max-batch", str(requests))
    with served(model_dir, log, SERVED_NAME, *flags) as base_url:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        prompts = [f"Describe {caption}." for caption in caption_corpus(requests, seed=2)]

        def ask(prompt: str) -> str:
            messages = [{"role": "user", "content": prompt}]
            reply = client.chat.completions.create(
                model=SERVED_NAME,
                messages=messages,
                temperature=0,
                max_tokens=tokens,
                extra_body={"mmllm": {"reply_modality": "text"}},
            )
            return reply.choices[0].message.content

        def sequential() -> list[str]:
            return [ask(p) for p in prompts]

        def concurrent() -> list[str]:
            with ThreadPoolExecutor(max_workers=requests) as pool:
                return list(pool.map(ask, prompts))

        reference = sequential()  # also the warm-up
        seconds: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        for repeat in range(repeats):
            order = ("sequential", "concurrent") if repeat % 2 == 0 else ("concurrent", "sequential")
            for name in order:
                began = time.perf_counter()
                replies = sequential() if name == "sequential" else concurrent()
                seconds[name].append(time.perf_counter() - began)
                if replies != reference:
                    raise MMLLMError(f"{name} replies differ from the first sequential pass; batching changed outputs")
    rates = {name: requests / statistics.median(times) for name, times in seconds.items()}
    return {
        "benchmark": "serve",
        "model": str(model_dir),
        "requests": requests,
        "tokens": tokens,
        "repeats": repeats,
        "machine": platform.processor() or platform.machine(),
        "requests_per_s": rates,
        "seconds": seconds,
        "ratio": rates["concurrent"] / rates["sequential"],
    }


def format_serve_bench(result: dict) -> str:
    rates = result["requests_per_s"]
    return "\n".join(
        [
            f"{result['requests']} greedy chat requests of {result['tokens']} new tokens, "
            f"{result['repeats']} alternating repeats (median)",
            f"one at a time: {rates['sequential']:.1f} requests/s",
            f"concurrent:    {rates['concurrent']:.1f} requests/s (identical replies)",
            f"ratio: {result['ratio']:.2f}",
        ]
    )
