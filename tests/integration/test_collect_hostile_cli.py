"""Hostile input to `lmforge collect` end to end (issue 20): a seed URL's password never reaches a file,
stdout or stderr; a 40 MB single-line text file is skipped in bounded memory, not held a dozen times.

Real things: the loopback site of tests/fixtures/collect/site.py, the `lmforge` CLI and a Python
subprocess whose peak memory is read from the kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import run_cli
from fixtures.collect.site import Site

SECRET = "s3cretPassw0rd"


@pytest.fixture
def site():
    server = Site().start()
    yield server
    server.stop()


def test_a_seed_password_is_never_written_or_printed(site, tmp_path):
    with_password = site.url("/a").replace("://", f"://alice:{SECRET}@")
    fast = {"requests_per_second": 100, "backoff_s": 0.05, "timeout_s": 5, "retries": 0}
    config = {"data": {
        "sources": [
            {"type": "web", "seeds": [site.url("/"), with_password], "max_depth": 0,
             "allow_networks": ["127.0.0.0/8"], "fetch": fast},
            {"type": "feed", "name": "news", "urls": [site.url("/feed.xml").replace("://", f"://bob:{SECRET}@")],
             "allow_networks": ["127.0.0.0/8"], "fetch": fast},
        ],
        "instructions": {"source": "none"}, "progress_interval_s": 0}}
    path = tmp_path / "collect.yaml"
    path.write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    done = run_cli(["collect", str(path), "--json"], home, timeout=300)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout and SECRET not in done.stderr
    leaked = [p for p in home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["per_source"]["web[0]"]["skipped"] == {"credentials_in_url": 1}
    assert result["per_source"]["news"]["skipped"] == {"credentials_in_url": 1}
    manifest = json.loads((home / "data" / "raw" / "manifest.json").read_text())
    assert manifest["sources"][0]["seeds"][1] == site.url("/a").replace("://", "://***@")
    assert site.requested("/a") == 0 and site.requested("/feed.xml") == 0  # dropped, never fetched
    assert not any("Authorization" in headers for _, headers in site.log)


def test_a_huge_single_line_file_is_skipped_in_bounded_memory(tmp_path):
    """A 40 MB one-line .txt (over the default max_document_bytes of 16 MiB) next to a small one:
    the peak memory of collecting both exceeds that of the small one alone by less than the file's size."""
    big = tmp_path / "big" / "one-line.txt"
    big.parent.mkdir()
    big.write_bytes(b"word " * (8 * 2**20))
    small = tmp_path / "small.txt"
    small.write_text("A small document that fits, long enough to be a real document for the corpus.")
    script = textwrap.dedent(f"""
        import json, resource
        from pathlib import Path
        from lmforge.config.data import DataConfig, InstructionConfig, LocalSource
        from lmforge.core.workspace import Workspace
        from lmforge.stages.collect import collect

        def run(paths, home):
            cfg = DataConfig(sources=[LocalSource(paths=paths)], instructions=InstructionConfig(source="none"),
                             progress_interval_s=0)
            result = collect(cfg, Workspace(Path(home)))
            return result.per_source["local[0]"]["skipped"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        _, warm = run([{str(small)!r}], {str(tmp_path / "warm")!r})
        skipped, peak = run([{str(small)!r}, {str(big.parent)!r}], {str(tmp_path / "home")!r})
        print(json.dumps({{"skipped": skipped, "growth_kib": peak - warm}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["skipped"] == {"too_large": 1}
    assert facts["growth_kib"] * 1024 < big.stat().st_size  # before: ~11x the file's size
