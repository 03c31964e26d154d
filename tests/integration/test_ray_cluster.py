"""A real 2-node Ray cluster on this machine, started with README.md's commands ("A Ray cluster").

``ray start --head`` and ``ray start --address=HEAD_IP:6379 --resources='{"node2": 1}'`` run as a
user runs them, with token authentication (``RAY_AUTH_MODE=token``, the token that
``ray get-auth-token --generate`` writes to ``~/.ray/auth_token``, under a HOME of the test's own).
Two nodes share one machine here, so each gets its own temp dir and free ports (and never the ports
or the processes of another Ray on this machine): the flags :func:`node_flags` adds to the README's
words. Teardown stops exactly these nodes, by their process groups; never ``ray stop``, which stops
every Ray of the machine. One cluster serves the whole module (a node start is ~10 s). The tests:
a Ray task that asks for ``node2`` runs there; ``lmforge train`` with ``RAY_ADDRESS`` trains on the
cluster, its worker pinned to node 2 by ``training.placement.resources``; with a wrong token it
fails with lmforge's error naming the token settings (:mod:`lmforge.core.ray_cluster`); and the whole
pipeline, ``lmforge run`` with ``LMFORGE_HOME=s3://...`` on an S3-compatible server (moto), run from
a directory that is not the workspace, trains on node 2 and leaves every output in the bucket.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, free_port
from fixtures.collect.s3 import SECRET, bucket_keys, client, s3_server
from readme import argv, readme_command

from lmforge.config.model import ModelConfig
from lmforge.core.storage import MARKER

pytest.importorskip("ray")

BUCKET = "lmforge-cluster"
MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=64)


def command_env(command: str, **fill: str) -> tuple[dict[str, str], str]:
    """A README shell line's variable assignments (``export A=b``, or ``A=b cmd``), placeholders
    filled, and the command after them."""
    words = shlex.split(command)
    if words[0] == "export":
        words = words[1:]
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        for placeholder, real in fill.items():
            value = value.replace(placeholder, real)
        env[name] = value
    return env, shlex.join(words)


def ray_argv(command: str, **fill: str) -> list[str]:
    words = argv(command, **fill)
    return [str(BIN / "ray"), *words[1:]] if words[0] == "ray" else words


def node_flags(temp_dir: Path) -> list[str]:
    """What two nodes on one machine must not share: a temp dir (sockets, logs, session) and every
    port a node listens on. One CPU each and a small object store: this machine is shared."""
    ports = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    return ["--num-cpus=1", f"--temp-dir={temp_dir}", f"--object-store-memory={200 * 2**20}", "--disable-usage-stats",
            *(f"{flag}={free_port()}" for flag in ports)]


def start_node(command: list[str], env: dict[str, str], log: Path) -> int:
    """Run ``ray start`` (it returns once the node is up, leaving the node's processes running) in a
    process group of its own, whose id is returned: the node's processes stay in it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid)
        raise
    if code != 0:
        stop_group(proc.pid)
        raise RuntimeError(f"{shlex.join(command)} exited with {code}:\n{log.read_text()[-3000:]}")
    return proc.pid


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int) -> None:
    # A node's GCS and raylet can take 20 s and more to exit on SIGTERM; these nodes' state is
    # thrown away with their temp dir, so a short grace is enough.
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        with suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace_s
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_alive(pgid):
            return


def processes_using(root: Path) -> list[int]:
    """Processes whose command line names ``root``: only this cluster's (the directory is new)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with suppress(psutil.Error):
            if str(root) in " ".join(proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
    return found


# Two ray start nodes and the runs on them take one to two minutes on a busy 2-core machine: the slow tier
# (make test-slow, which CI runs after make test).
CLUSTER = pytest.mark.slow


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3-compatible server (moto on loopback) for the module; its fake credentials are in the
    environment the nodes start with, as a real cluster's nodes have theirs (an instance role, env)."""
    with s3_server() as endpoint:
        client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def cluster(s3) -> Iterator[dict]:
    # A short path: Ray's unix sockets live under the temp dir and their paths must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="lmf-ray-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    auth_env, _ = command_env(readme_command("export RAY_AUTH_MODE=token"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(auth_env, HOME=str(home), AWS_ENDPOINT_URL=s3)
    token = subprocess.run(ray_argv(readme_command("ray get-auth-token --generate")), env=env, capture_output=True, text=True,
                           timeout=120)
    assert token.returncode == 0, token.stderr[-3000:]
    assert (home / ".ray" / "auth_token").read_text().strip() == token.stdout.strip()
    port = str(free_port())
    groups = []
    try:
        head = [*ray_argv(readme_command("ray start --head --port=6379"), **{"6379": port}), *node_flags(root / "head"),
                f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"]
        groups.append(start_node(head, env, root / "head.log"))
        node2 = ray_argv(readme_command("ray start --address=HEAD_IP:6379"), HEAD_IP="127.0.0.1", **{"6379": port})
        groups.append(start_node([*node2, *node_flags(root / "node2")], env, root / "node2.log"))
        yield {"address": f"127.0.0.1:{port}", "env": env, "root": root, "port": port}
    finally:
        for pgid in reversed(groups):
            stop_group(pgid)
        # Anything of ours that left its group (none should): found by our own temp dir.
        for pid in processes_using(root):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def run_driver(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@CLUSTER
def test_a_task_asking_for_node2_runs_on_the_second_node(cluster):
    result = run_driver(f"""
        import json, ray
        ray.init(address="{cluster['address']}", logging_level="ERROR")

        @ray.remote(num_cpus=0, resources={{"node2": 1}})
        def where():
            return ray.get_runtime_context().get_node_id()

        nodes = {{n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}}
        print(json.dumps({{"nodes": nodes, "task": ray.get(where.remote())}}))
    """, cluster["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(facts["nodes"]) == 2
    head = next(node for node, resources in facts["nodes"].items() if "node:__internal_head__" in resources)
    second = next(node for node, resources in facts["nodes"].items() if "node2" in resources)
    assert facts["task"] == second != head


def node_logs_mention(temp_dir: Path, text: str) -> bool:
    return any(text in path.read_text(errors="replace") for path in temp_dir.glob("session_*/logs/worker-*"))


@pytest.fixture(scope="module")
def pinned(tokenized_workspace, tmp_path_factory) -> dict:
    """A workspace ready for training and a tiny config whose one Ray Train worker asks for node2."""
    ws = tokenized_workspace("cluster-train", MODEL)
    config = tmp_path_factory.mktemp("cluster-config") / "cluster.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {json.dumps(MODEL.model_dump(include={'vocab_size', 'hidden_size', 'num_layers', 'num_heads',
                                                       'num_kv_heads', 'intermediate_size', 'max_seq_len'}))}
        training:
          method: pretrain
          pretrain: {{steps: 6, learning_rate: 0.01, batch_size: 4, seq_len: 32, warmup_steps: 1}}
          placement: {{num_workers: 1, cpus_per_worker: 0.5, resources: {{node2: 1}}}}
          validation: {{batches: 1}}
          logging: {{every: 2}}
          cpu_threads: 1
    """))
    return {"ws": ws, "config": config}


def readme_train(cluster: dict, pinned: dict, **env: str) -> subprocess.CompletedProcess:
    """README's `RAY_ADDRESS=HEAD_IP:6379 lmforge train CONFIG` (with --json) against this cluster."""
    assignments, command = command_env(readme_command("RAY_ADDRESS=HEAD_IP:6379 lmforge train CONFIG"),
                                       HEAD_IP="127.0.0.1", **{"6379": cluster["port"]})
    assert assignments == {"RAY_ADDRESS": cluster["address"]}
    full_env = {**cluster["env"], **assignments, "LMFORGE_HOME": str(pinned["ws"].home), **env}
    return subprocess.run([*argv(command, CONFIG=str(pinned["config"])), "--json"], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@CLUSTER
def test_lmforge_train_runs_on_the_cluster_pinned_to_node2(cluster, pinned):
    result = readme_train(cluster, pinned)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(facts["model_dir"], "config.json").is_file()
    # The Ray Train worker (an actor) logged on node 2, not on the head.
    root = cluster["root"]
    assert node_logs_mention(root / "node2", "RayTrainWorker")
    assert not node_logs_mention(root / "head", "RayTrainWorker")


@CLUSTER
def test_lmforge_without_the_token_says_which_setting_to_fix(cluster, pinned, tmp_path):
    # Ray retries a refused connection for ~20 s by default (the seconds it waits for a GCS to come up).
    result = readme_train(cluster, pinned, HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token",
                          RAY_gcs_server_port_wait_time_s="2")
    assert result.returncode == 2, (result.stdout[-3000:], result.stderr[-3000:])
    assert f"error: the Ray cluster at {cluster['address']} refused this process" in result.stderr
    assert "fix:" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr and "not-the-token" not in result.stderr + result.stdout


@CLUSTER
def test_lmforge_run_on_s3_trains_on_node2_and_keeps_every_output_in_the_bucket(cluster, s3, tmp_path,
                                                                                 prefect_server):
    cwd, cache = tmp_path / "elsewhere", tmp_path / "cache"
    cwd.mkdir()
    config = tmp_path / "cluster-s3.yaml"
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    tiny["training"]["placement"] = {"num_workers": 1, "cpus_per_worker": 0.5, "resources": {"node2": 1}}
    config.write_text(yaml.safe_dump(tiny))
    url = f"s3://{BUCKET}/team"
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "LMFORGE_HOME": url, "LMFORGE_CACHE": str(cache),
           "PREFECT_API_URL": prefect_server}
    try:
        done = subprocess.run([str(BIN / "lmforge"), "run", str(config), "--json"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        assert SECRET not in done.stdout + done.stderr
        summary = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
        assert summary["version"] == "1"
        s3c = client(s3)
        keys = set(bucket_keys(s3c, BUCKET, "team"))
        run = json.loads(s3c.get_object(Bucket=BUCKET, Key="team/state/train.json")["Body"].read())["run_id"]
        for committed in ("data/curated", "data/validation", "tokenizer", f"runs/{run}"):
            assert f"{committed}/{MARKER}" in keys, committed
        assert {f"runs/{run}/model/config.json", "state/evaluate.json", "state/register.json"} <= keys
        assert not any(k.startswith("ray/train/") for k in keys)  # the run's Ray checkpoints, removed once it ended
        assert list(cwd.iterdir()) == []
        # The Ray Train worker ran on node 2 (its own cache, no view of the driver's disk), not on the head.
        assert node_logs_mention(cluster["root"] / "node2", "RayTrainWorker")
        assert not node_logs_mention(cluster["root"] / "head", "RayTrainWorker")
    finally:
        subprocess.run([str(BIN / "lmforge"), "deploy", str(config), "--stop"], cwd=cwd, env=env, capture_output=True,
                       timeout=120)


def test_placement_resources_are_custom_ones_only():
    from lmforge.config.loader import parse_config
    from lmforge.core.errors import ConfigError

    placement = parse_config({"training": {"placement": {"resources": {"node2": 1}}}}).training.placement
    assert placement.resources == {"node2": 1.0}
    for bad in ({"CPU": 2}, {"node2": 0}):
        with pytest.raises(ConfigError, match=r"training\.placement"):
            parse_config({"training": {"placement": {"resources": bad}}})
