"""Poisson load generator for the OpenAI-compatible server: time-to-first-token and inter-token
latency (p50/p99) and throughput against the request rate, over real HTTP with streaming.

    python -m bench.serve.load --model DIR [--rates 1 4 16] [--requests 32] [--out DIR]
    python -m bench.serve.load --url http://127.0.0.1:8000 --model-name NAME [--api-key KEY] ...
    python -m bench.serve.load --tiny       # a random tiny model served here, a few requests: a check

With ``--model`` it starts the server itself (in this process, on a free loopback port); with
``--url`` it loads an already running one. Each request streams ``/v1/completions`` with a prompt
of ``--prompt-words`` words and ``--max-tokens`` new tokens; arrivals are a Poisson process of each
rate. Also counts non-200 answers, so it doubles as an overload probe (``--rates 1000``).
Figures go to OUT/serve_load.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import tempfile
import time
from pathlib import Path

import httpx

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import command_line, record
from bench.common.serve import percentile, save_tiny_model

WORDS = ["the", "json", "module", "serializes", "objects", "to", "strings", "and", "parses", "them", "back", "into",
         "python", "values"]
TINY_WORDS = [f"t{i}" for i in range(3, 40)]  # words of the tiny model's word-level vocabulary


async def one(http: httpx.AsyncClient, body: dict, out: dict) -> None:
    start = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            out["errors"][reply.status_code] = out["errors"].get(reply.status_code, 0) + 1
            await reply.aread()
            return
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    if stamps:
        out["ttft"].append(stamps[0] - start)
        out["itl"].extend(b - a for a, b in itertools.pairwise(stamps))
        out["tokens"] += len(stamps)


async def run_rate(url: str, rate: float, requests: int, body: dict, headers: dict, seed: int) -> dict:
    rng = random.Random(seed)
    out: dict = {"ttft": [], "itl": [], "tokens": 0, "errors": {}}
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits) as http:
        tasks = []
        start = time.perf_counter()
        for _ in range(requests):
            await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(one(http, body, out)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"rate": rate, "ttft_p50": percentile(out["ttft"], 50), "ttft_p99": percentile(out["ttft"], 99),
            "itl_p50": percentile(out["itl"], 50), "itl_p99": percentile(out["itl"], 99),
            "output_tok_s": out["tokens"] / wall, "ok": len(out["ttft"]), "errors": out["errors"]}


def start_server(model_dir: Path, max_batch_size: int):
    """Serve ``model_dir`` in a thread of this process; returns (url, stop)."""
    import threading

    import uvicorn

    from lmforge.config.serving import SchedulerConfig, ServingConfig
    from lmforge.serving.api.launch import bind_socket, url_for
    from lmforge.serving.api.server import create_app
    from lmforge.serving.engine import Engine
    from lmforge.serving.engine.metrics import EngineMetrics

    cfg = ServingConfig(scheduler=SchedulerConfig(max_batch_size=max_batch_size, max_queue=4096), max_new_tokens=1024)
    engine = Engine.load(model_dir, cfg=cfg, metrics=EngineMetrics())
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench", cfg), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()

    return url_for(sock), stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory: start a server for it in this process")
    parser.add_argument("--url", help="base URL of a running server")
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--rates", nargs="+", type=float, default=None, metavar="RATE",
                        help="request rates per second (default 1 4 16; 20 with --tiny)")
    parser.add_argument("--requests", type=int, default=None, help="requests per rate (default 32; 4 with --tiny)")
    parser.add_argument("--prompt-words", type=int, default=None, help="default 48; 8 with --tiny")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 64; 4 with --tiny")
    parser.add_argument("--max-batch-size", type=int, default=16, help="with --model")
    add_common_arguments(parser, "a random tiny model served in this process, a few short requests: a check")
    args = parser.parse_args()
    tiny = args.tiny
    args.rates = args.rates or ([20.0] if tiny else [1.0, 4.0, 16.0])
    args.requests = args.requests or (4 if tiny else 32)
    args.prompt_words = args.prompt_words or (8 if tiny else 48)
    args.max_tokens = args.max_tokens or (4 if tiny else 64)
    if not args.url and not args.model and not tiny:
        parser.error("give --model DIR (start a server) or --url URL (use a running one)")
    out = out_dir(args)
    with tempfile.TemporaryDirectory(prefix="bench-serve-load-") as tmp:
        if tiny and not args.url and not args.model:
            args.model = save_tiny_model(Path(tmp) / "model")
        load(args, out)
    print(f"records in {out}")


def load(args: argparse.Namespace, out: Path) -> None:
    url, stop = (args.url, None) if args.url else start_server(args.model, args.max_batch_size)
    words = TINY_WORDS if args.tiny else WORDS
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_words))
    # ignore_eos: every request does the same work whatever the model says (an lmforge extension).
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if args.model_name:
        body["model"] = args.model_name
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    command = command_line()
    try:
        for i, rate in enumerate(args.rates):
            res = asyncio.run(run_rate(url, rate, args.requests, body, headers, seed=i))
            print(json.dumps(res), flush=True)
            for key in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "output_tok_s"):
                record("serve_load", f"http_{rate:g}rps_{key}", res[key], "tok/s" if key == "output_tok_s" else "s",
                       "", None, command=command, out_dir=out)
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    run(main)
