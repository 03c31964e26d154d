"""A roll under load: latency p50/p99 while ``lmforge deploy`` swaps the served model, against steady state in the
same run, and the failed requests (goal 0).

    python -m bench.serve.roll [--platform local|ray] [--model DIR] [--clients 4] [--steady-s 20] [--max-tokens 8]
    python -m bench.serve.roll --tiny      # a random tiny model, short windows: a check

The deploy stage serves copy A of the model (default: the random tiny model of bench.common.serve), then
``--clients`` closed-loop clients send short completions through its endpoint for ``--steady-s`` seconds
(the steady state), then a deploy of copy B (another directory, so a new release: the stage rolls) runs
while they keep going, then ``--after-s`` more seconds. A request is "during the roll" when it was in
flight at any moment between the roll's start and end. ``--platform ray`` deploys with
``serving.platform: ray`` and ``serving.ray.num_replicas: --replicas`` through the same ``deploy()``
(the Ray Serve platform's own dispatch). Figures go to OUT/serve_roll.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.common.serve import percentile, save_tiny_model

BENCH = "serve_roll"
PROMPT = "t3 t4 t5 t6"  # words of the tiny model's word-level vocabulary; any text for a real one


class Load:
    """Closed-loop clients on keep-alive connections; every request's (start, end, status) kept."""

    def __init__(self, endpoint: str, model_name: str, clients: int, max_tokens: int) -> None:
        self.body = {"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        self.endpoint = endpoint
        self.samples: list[tuple[float, float, str]] = []  # list.append is atomic under the GIL
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        with httpx.Client(base_url=self.endpoint, timeout=120) as http:
            while not self.stopping.is_set():
                start = time.monotonic()
                try:
                    status = str(http.post("/v1/completions", json=self.body).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.samples.append((start, time.monotonic(), status))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=180)


def window(samples: list[tuple[float, float, str]], start: float, end: float) -> dict[str, Any]:
    """Latency (ms) of the requests in flight at some moment of [start, end], and the failed ones among them."""
    inside = [s for s in samples if s[0] <= end and s[1] >= start]
    ok = [(e - b) * 1000 for b, e, status in inside if status == "200"]
    return {"requests": len(inside), "failed": len(inside) - len(ok), "p50_ms": percentile(ok, 50),
            "p99_ms": percentile(ok, 99)}


def serving_config(args: argparse.Namespace):
    from lmforge.config.serving import ServingConfig

    fields: dict[str, Any] = {"max_new_tokens": args.max_tokens, "platform": args.platform,
                              "server": {"startup_timeout_s": 600, "drain_timeout_s": 60}}
    if args.platform == "ray":
        from lmforge.stack.processes import free_port

        # A free port for Serve's proxy: 8000 may be taken on a shared machine.
        fields["ray"] = {"num_replicas": args.replicas, "http_port": free_port()}
    return ServingConfig.model_validate(fields)


def start_ray(replicas: int) -> None:
    """Join RAY_ADDRESS if set, else start a Ray in this process: the Serve application lives while it does.

    Logical CPUs for the replicas and as many surge replicas during the roll (one CPU each)."""
    import logging
    import os

    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(num_cpus=2 * replicas, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)


def measure(args: argparse.Namespace, model: Path, tmp: Path) -> dict[str, Any]:
    from lmforge.core.workspace import Workspace
    from lmforge.stages.deploy import deploy, stop

    first, second = tmp / "model-a", tmp / "model-b"
    shutil.copytree(model, first)
    shutil.copytree(model, second)
    ws, cfg = Workspace(tmp / "home").ensure(), serving_config(args)
    deployed = deploy(cfg, str(first), ws, "roll-bench")
    try:
        with Load(deployed.endpoint, "roll-bench", args.clients, args.max_tokens) as load:
            time.sleep(args.warmup_s)
            steady_from = time.monotonic()
            time.sleep(args.steady_s)
            roll_from = time.monotonic()
            rolled = deploy(cfg, str(second), ws, "roll-bench")
            roll_to = time.monotonic()
            time.sleep(args.after_s)
        end = time.monotonic()
    finally:
        stop(ws)
    # Steady state: only requests that finished before the roll began.
    steady = window([s for s in load.samples if s[1] < roll_from], steady_from, roll_from)
    during, after = window(load.samples, roll_from, roll_to), window(load.samples, roll_to, end)
    return {"platform": args.platform, "action": rolled.action, "same_endpoint": rolled.endpoint == deployed.endpoint,
            "roll_s": round(roll_to - roll_from, 2), "steady": steady, "during_roll": during, "after": after,
            "failed_total": sum(1 for s in load.samples if s[2] != "200"), "requests_total": len(load.samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", choices=["local", "ray"], default="local", help="serving.platform to roll on")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the random tiny model)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent closed-loop clients")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 8; 2 with --tiny)")
    parser.add_argument("--warmup-s", type=float, default=None, help="load before measuring (default 5; 1 with --tiny)")
    parser.add_argument("--steady-s", type=float, default=None, help="steady-state window (default 20; 3 with --tiny)")
    parser.add_argument("--after-s", type=float, default=None, help="load after the roll (default 5; 1 with --tiny)")
    parser.add_argument("--replicas", type=int, default=2, help="serving.ray.num_replicas with --platform ray")
    add_common_arguments(parser, "a random tiny model, short windows: a check")
    args = parser.parse_args()
    tiny = args.tiny
    args.max_tokens = args.max_tokens or (2 if tiny else 8)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (1.0 if tiny else 5.0)
    args.steady_s = args.steady_s if args.steady_s is not None else (3.0 if tiny else 20.0)
    args.after_s = args.after_s if args.after_s is not None else (1.0 if tiny else 5.0)
    out = out_dir(args)
    if args.platform == "ray":
        start_ray(args.replicas)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or save_tiny_model(Path(tmp) / "model")
        result = measure(args, Path(model), Path(tmp))
    print(json.dumps(result), flush=True)
    steady, during = result["steady"], result["during_roll"]
    note = f"{args.platform}, {args.clients} clients, steady state in the same run"
    for q in ("p50", "p99"):
        record(BENCH, f"{args.platform}_{q}_latency_during_roll_ms", during[f"{q}_ms"], "ms", note,
               steady[f"{q}_ms"], higher_is_better=False, out_dir=out)
    record(BENCH, f"{args.platform}_failed_requests_during_roll", during["failed"], "requests",
           f"goal 0, of {during['requests']} in flight during the {result['roll_s']} s roll", None, out_dir=out)
    record(BENCH, f"{args.platform}_failed_requests_whole_run", result["failed_total"], "requests",
           f"goal 0, of {result['requests_total']}", None, out_dir=out)
    return 0 if result["failed_total"] == 0 and result["action"] == "rolled" and result["same_endpoint"] else 1


if __name__ == "__main__":
    run(main)
