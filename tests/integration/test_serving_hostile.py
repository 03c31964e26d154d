"""Hostile requests against a real server on loopback (issue 20, items 1 and 11's serving bits).

Huge bodies are refused with 413 before they are read and leave the process's memory where it
was; a long prompt is tokenized off the event loop, so ``/health`` keeps answering; the API key
comes from a file, never the command line; a model path that does not exist fails in a moment.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import BIN, REPO, free_port, wait_http
from helpers import running

from lmforge.config.serving import LimitsConfig, ServingConfig
from lmforge.serving.engine import Engine

MB = 1024 * 1024


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine.load(model_dir, device="cpu", cfg=ServingConfig(max_new_tokens=2))
    yield eng
    eng.close()


def _rss() -> int:
    """This process's resident memory in bytes (the server runs in a thread of it)."""
    fields = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()
    return int(fields[0]) * 1024


def _upload(url: str, size: int, declared: bool) -> httpx.Response:
    """POST ``size`` bytes of a JSON prompt, streamed from one reused 1 MiB piece (the client holds no copy):
    with its Content-Length, or chunked."""
    piece = b"x" * MB

    def body() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(size // MB):
            yield piece
        yield b'"}'

    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = str(len(b'{"prompt": ""}') + size // MB * MB)
    return httpx.post(f"{url}/v1/completions", content=body(), headers=headers, timeout=30)


def test_huge_bodies_get_413_at_once_and_leave_memory_flat(engine: Engine) -> None:
    cfg = ServingConfig(max_new_tokens=2)
    near_limit = {"prompt": "x" * (cfg.limits.max_body_bytes - MB)}  # fits the body, not the prompt bound

    def reject_all(url: str) -> None:
        for size, declared in [(50 * MB, True), (10 * MB, False), (30 * MB, False)]:
            started = time.monotonic()
            reply = _upload(url, size, declared)
            assert reply.status_code == 413, reply.text
            assert reply.json()["error"]["code"] == "request_too_large"
            assert time.monotonic() - started < 10  # the old server tokenized 50 MB for 78 s
        reply = httpx.post(f"{url}/v1/completions", json=near_limit, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"

    with running(engine, cfg) as (url, _):
        reject_all(url)  # once to warm up: the allocator keeps its high-water mark, which is the baseline
        gc.collect()
        baseline = _rss()
        for _ in range(2):
            reject_all(url)
        gc.collect()
        after = _rss()
        assert after <= baseline * 1.10, f"RSS grew from {baseline / MB:.0f} MiB to {after / MB:.0f} MiB"
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        assert ok.status_code == 200, ok.text


def test_health_answers_while_a_long_prompt_is_tokenized(engine: Engine) -> None:
    # A bound loose enough to let ~1.5 MB through to the tokenizer (about two seconds of work here).
    cfg = ServingConfig(max_new_tokens=2, limits=LimitsConfig(max_chars_per_token=100_000))
    rng = random.Random(0)
    prompt = " ".join(rng.choice(["alpha", "beta", "json", "dumps", "quick", "brown"]) for _ in range(250_000))
    latencies: list[float] = []
    with running(engine, cfg) as (url, _):
        done = threading.Event()
        replies: list[httpx.Response] = []

        def send() -> None:
            replies.append(httpx.post(f"{url}/v1/completions", json={"prompt": prompt}, timeout=120))
            done.set()

        sender = threading.Thread(target=send)
        started = time.monotonic()
        sender.start()
        with httpx.Client(base_url=url, timeout=120) as http:
            while not done.is_set():
                t0 = time.monotonic()
                assert http.get("/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)
        sender.join()
        took = time.monotonic() - started
    reply = replies[0]
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded", reply.text
    # Health went on answering throughout: many times, each far quicker than the tokenization.
    assert len(latencies) >= 5 and max(latencies) < took / 2, (max(latencies), took, len(latencies))


def test_missing_model_path_fails_fast_before_heavy_imports(tmp_path: Path) -> None:
    env = dict(os.environ, LMFORGE_HOME=str(tmp_path / "home"))
    started = time.monotonic()
    cli = subprocess.run([str(BIN / "lmforge"), "serve", str(tmp_path / "no-such-model")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert cli.returncode == 2 and "error:" in cli.stderr and "fix:" in cli.stderr and "Traceback" not in cli.stderr
    assert "does not exist" in cli.stderr and took < 10, (took, cli.stderr)  # was 19 s: it loaded torch first
    probe = ("import sys\nfrom lmforge.cli import main\n"
             f"code = main(['serve', {str(tmp_path / 'no-such-model')!r}])\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'uvicorn', 'mlflow') if m in sys.modules)\n"
             "print(code, heavy)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr


def test_api_key_from_a_file_stays_off_the_command_line(model_dir: Path, tmp_path: Path) -> None:
    key = "k3y-from-a-file"
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}
    proc = subprocess.Popen([str(BIN / "lmforge"), "serve", str(model_dir), "--port", str(port),
                             "--api-key-file", str(key_file)], env=dict(env, LMFORGE_HOME=str(tmp_path / "home")),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout=120, proc=proc)
        assert key not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        body = {"prompt": "hi", "max_tokens": 1}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"bearer {key}"})
        assert ok.status_code == 200, ok.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
