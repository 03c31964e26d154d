"""Benchmark: loopback crawl throughput (pages/s) under the politeness settings, CPU.

    .venv/bin/python -m bench.data.collect_crawl [--hosts 4] [--pages 50] [--rate 20] [--tiny] [--out DIR]

Serves ``--pages`` linked HTML pages on each of ``--hosts`` loopback addresses (127.0.0.1,
127.0.0.2, ...; one real HTTP server per address), then crawls them all with the web source at
``--rate`` requests/s per host (robots.txt included). The baseline, measured in the same run, is
the ceiling that politeness allows: ``hosts × rate`` requests/s, i.e. the fastest a crawl obeying
the rate limit could go. Figures go to OUT/collect_crawl.jsonl (``bench.common.record``).
``--tiny``: 2 hosts of 6 pages at 50 requests/s, a check of this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from lmforge.config.data import DataConfig, FetchConfig, InstructionConfig, WebSource
from lmforge.core.workspace import Workspace
from lmforge.stages.collect import collect


def _page(host: str, i: int, pages: int) -> bytes:
    # A ternary tree, like a site's sections: page i links to pages 3i+1..3i+3.
    links = "".join(f'<a href="/p/{j}">page {j}</a> ' for j in (3 * i + 1, 3 * i + 2, 3 * i + 3) if j < pages)
    text = " ".join(f"Sentence {k} of page {i} on {host} about polite crawling and provenance." for k in range(30))
    return (f"<html><head><title>Page {i}</title></head><body><nav>menu</nav><article><h1>Page {i}</h1>"
            f"<p>{text}</p>{links}</article><footer>footer</footer></body></html>").encode()


def serve(host: str, pages: int) -> ThreadingHTTPServer:
    bodies = {f"/p/{i}": _page(host, i, pages) for i in range(pages)}
    bodies["/robots.txt"] = b"User-agent: *\nAllow: /\n"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = bodies.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/plain" if self.path == "/robots.txt" else "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=None, help="loopback hosts (default 4; 2 with --tiny)")
    parser.add_argument("--pages", type=int, default=None, help="pages per host (default 50; 6 with --tiny)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s per host (default 20; 50 with --tiny)")
    add_common_arguments(parser, "2 small sites at a high rate: a check of this script")
    args = parser.parse_args()
    args.hosts = args.hosts or (2 if args.tiny else 4)
    args.pages = args.pages or (6 if args.tiny else 50)
    args.rate = args.rate or (50.0 if args.tiny else 20.0)
    out = out_dir(args)
    servers = [serve(f"127.0.0.{n + 1}", args.pages) for n in range(args.hosts)]
    seeds = [f"http://{s.server_address[0]}:{s.server_address[1]}/p/0" for s in servers]
    fetch = FetchConfig(requests_per_second=args.rate, concurrency=2 * args.hosts, concurrency_per_host=2)
    web = WebSource(seeds=seeds, allow_networks=["127.0.0.0/8"], fetch=fetch, max_pages=args.hosts * args.pages,
                    max_depth=args.pages)
    cfg = DataConfig(sources=[web], instructions=InstructionConfig(source="none"), progress_interval_s=0)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        started = time.perf_counter()
        result = collect(cfg, Workspace(Path(tmp)))
        elapsed = time.perf_counter() - started
    for server in servers:
        server.shutdown()
    pages = result.per_source["web[0]"]["units"]
    requests = pages + args.hosts  # each host's robots.txt takes a turn of its rate limit too
    ceiling = args.hosts * args.rate
    command = (f".venv/bin/python -m bench.data.collect_crawl --hosts {args.hosts} --pages {args.pages} "
               f"--rate {args.rate:g}" + (" --tiny" if args.tiny else ""))
    baseline = f"politeness ceiling: {args.hosts} hosts x {args.rate:g} requests/s per host"
    for metric, value in (("pages_per_s", pages / elapsed), ("requests_per_s", requests / elapsed)):
        print(json.dumps(record("collect_crawl", metric, round(value, 2), "pages/s" if metric == "pages_per_s" else
                                "requests/s", baseline, ceiling, command=command, out_dir=out)))
    print(f"{pages} pages ({result.documents_total} documents) from {args.hosts} hosts in {elapsed:.2f}s; "
          f"ceiling {ceiling:g} requests/s", file=sys.stderr)


if __name__ == "__main__":
    run(main)
