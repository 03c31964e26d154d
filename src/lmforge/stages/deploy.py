"""Deploy stage: serve a model on a stable local endpoint, rolling to a new version without a failed request.

    from lmforge.stages.deploy import deploy, stop
    result = deploy(cfg.serving, "models:/lmforge-demo@champion", ws, "lmforge-demo")
    result.action  # "deployed" (first start), "rolled", "moved" (new port), or "unchanged"
    stop(ws)

The endpoint is a small front proxy (``python -m lmforge.serving.api.proxy``) on a stable port
(``serving.server.port``; 0 picks a free one on the first deploy, and later deploys keep it). The
model server behind it (``python -m lmforge.serving``) listens on a loopback port of its own. A
deploy resolves what to serve first (the version the alias names now, see
:mod:`lmforge.tracking.deployment`); when that and the serving config equal what runs, it does
nothing. Otherwise it rolls: start the new server, probe it, switch the proxy to it, wait until no
request is in flight on the old one, stop the old one (``stages/rollout.py`` has the steps; the
proxy's docstring says why a proxy). A new server that fails its probe is stopped and the old one
keeps serving. The served version is tagged in MLflow (``lmforge.deploy.deployed_at``, ``.endpoint``)
and reported by ``/health`` and ``/v1/models``.

Both processes are detached (their own sessions) and outlive the caller: they are the deployment.
``ws.serving_dir`` holds ``server.json`` (pids, URLs, release, logs), the logs and ready files.
These are this machine's (a process id means nothing elsewhere): on an object-store workspace they
stay in its local side under the cache, while the ``deploy`` state hand-off is written to the store.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.serving.ray_serve import deploy_app, read_app, stop_app
from lmforge.stages import rollout
from lmforge.tracking.deployment import mark_deployed, resolve_release, retire, same_release

RECORD = "server.json"
CONFIG = "serving_config.json"
SERVER, PROXY = "lmforge.serving", "lmforge.serving.api.proxy"


@dataclass(frozen=True)
class DeployResult:
    """A running deployment, what changed, and the answer to its probe request."""

    endpoint: str  # the stable base URL, e.g. http://127.0.0.1:41234 (OpenAI routes live under /v1)
    model_name: str
    pid: int  # the model server's process (behind the proxy)
    probe_prompt: str
    probe_response: str  # "" when unchanged: nothing new was started, so nothing was probed
    latency_s: float  # wall time of the probe request (of the health check when unchanged)
    model_ref: str = ""
    action: str = "deployed"  # deployed | rolled | moved | unchanged
    version: str = ""  # the registry version served ("local" for a model directory)
    proxy_pid: int = 0
    release: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def deploy(cfg: ServingConfig, model_ref: str, ws: Workspace, model_name: str) -> DeployResult:
    """Serve ``model_ref`` (directory or ``models:/NAME@ALIAS``) at the stable endpoint; roll if it changed."""
    ws.serving_dir.mkdir(parents=True, exist_ok=True)
    release = resolve_release(model_ref, ws)
    if cfg.platform == "ray":  # replicas behind Ray Serve's proxy, rolled by Serve (serving/ray_serve)
        return _deploy_on_ray(cfg, release, ws, model_name)
    record = read_deployment(ws)
    proxy = _live(record, "proxy")
    digest = _digest(cfg, model_name)
    if (proxy and _live(record, "server") and record and same_release(record.get("release"), release)
            and record.get("config_digest") == digest and _keeps_port(cfg, proxy)):
        return _unchanged(record, cfg, ws)
    atomic_write_json(ws.serving_dir / CONFIG, cfg.model_dump(mode="json"))
    generation = int((record or {}).get("generation", 0)) + 1
    base = {"generation": generation, "model_name": model_name, "model_ref": model_ref, "release": release,
            "config_digest": digest}
    new = _start_server(cfg, ws, release, model_name, generation, record, base)
    if proxy and _keeps_port(cfg, proxy) and record:
        action, proxy = "rolled", _switch(cfg, ws, record, proxy, new, base)
    else:
        action = "moved" if proxy else "deployed"
        port = cfg.server.port or int(((record or {}).get("proxy") or {}).get("port", 0))  # keep the recorded port
        if record:
            _stop_record(record)  # a proxy on another port, or leftovers of a crashed deployment
        proxy = _start_proxy(cfg, ws, new, port)
        atomic_write_json(ws.serving_dir / RECORD, {**base, **new, "proxy": proxy, "endpoint": proxy["endpoint"]})
    served = rollout.health(proxy["endpoint"])
    if served.get("version") != release["version"]:
        raise ServingError(f"after the switch {proxy['endpoint']} serves version {served.get('version')!r}, "
                           f"not {release['version']!r}", "read the proxy's and the servers' logs, then deploy again")
    mark_deployed(ws, release, proxy["endpoint"], previous=(record or {}).get("release"))
    _prune(ws.serving_dir, generation)
    result = DeployResult(proxy["endpoint"], model_name, new["pid"], cfg.probe_prompt, new["probe_response"],
                          new["latency_s"], model_ref, action, release["version"], proxy["pid"], release)
    ws.write_state("deploy", result.as_dict())
    return result


def stop(ws: Workspace) -> bool:
    """Stop the deployment recorded in ``ws`` (proxy and servers); True when a live process of ours was stopped."""
    app, deleted = read_app(ws), False
    if app is not None:  # serving.platform: ray: delete the Serve application (and any local one below)
        deleted = stop_app(ws)
        retire(ws, app.get("release"))
    record = read_deployment(ws)
    if record is None:
        return deleted
    stopped = _stop_record(record)
    (ws.serving_dir / RECORD).unlink(missing_ok=True)
    retire(ws, record.get("release"))
    return stopped or deleted


def read_deployment(ws: Workspace) -> dict[str, Any] | None:
    """The recorded deployment (pid, endpoint, model_name, release, proxy, ...) or None."""
    path = ws.serving_dir / RECORD
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        path.unlink(missing_ok=True)  # unreadable record: nothing we can safely signal
        return None


def redeploy(ws: Workspace) -> DeployResult | None:
    """Deploy the running deployment's model reference again with its serving config, so a
    ``models:/NAME@ALIAS`` deployment rolls to the version the alias names now (rollback uses this).
    None when no server of ours is running."""
    app = read_app(ws)
    if app is not None:  # a Ray Serve application: Serve rolls it (it starts it again if it was lost)
        return deploy(ServingConfig.model_validate(app["serving_config"]), app["model_ref"], ws, app["model_name"])
    record = read_deployment(ws)
    if record is None or not _live(record, "server"):
        return None
    cfg = ServingConfig.model_validate_json((ws.serving_dir / CONFIG).read_text())
    return deploy(cfg, str(record["model_ref"]), ws, str(record["model_name"]))


def _deploy_on_ray(cfg: ServingConfig, release: dict[str, str], ws: Workspace, model_name: str) -> DeployResult:
    """``serving.platform: ray``: Serve rolls the application; then the same probe, version check and tags as here."""
    previous = (read_app(ws) or {}).get("release")
    app = deploy_app(cfg, release, ws, model_name)
    response, latency = ("", 0.0) if app.action == "unchanged" else rollout.probe(app.endpoint, model_name,
                                                                                  cfg.probe_prompt)
    served = rollout.health(app.endpoint)
    if served.get("version") != release["version"]:
        raise ServingError(f"{app.endpoint} serves version {served.get('version')!r}, not {release['version']!r}",
                           "another Serve application may hold the route: `serve status`; then deploy again")
    if app.action != "unchanged":
        mark_deployed(ws, release, app.endpoint, previous=previous)
    result = DeployResult(app.endpoint, model_name, 0, cfg.probe_prompt, response, latency, release["model_ref"],
                          app.action, release["version"], 0, release)
    ws.write_state("deploy", {**result.as_dict(), "platform": "ray", "app_name": app.app_name})
    return result


def _start_server(cfg: ServingConfig, ws: Workspace, release: dict[str, str], model_name: str, generation: int,
                  record: dict[str, Any] | None, base: dict[str, Any]) -> dict[str, Any]:
    """Start, wait for and probe the new server; recorded as pending meanwhile, stopped if it fails."""
    serving = ws.serving_dir
    ready, log, rel = (serving / f"{stem}-{generation}{ext}"
                       for stem, ext in (("ready", ".json"), ("server", ".log"), ("release", ".json")))
    ready.unlink(missing_ok=True)
    atomic_write_json(rel, release)
    proc = rollout.spawn(rollout.server_command(release["source"], model_name, ready, serving / CONFIG, rel), log, ws)
    pending = {"pid": proc.pid, "ready_file": str(ready), "log": str(log), "started_at": time.time()}
    # Recorded before it is ready, so a caller interrupted while waiting can still stop it.
    atomic_write_json(serving / RECORD, {**(record or base), "pending": pending})
    try:
        url = rollout.wait_ready(proc, ready, log, cfg.server.startup_timeout_s, "server")
        response, latency = rollout.probe(url, model_name, cfg.probe_prompt)
    except BaseException:
        rollout.terminate(proc.pid)
        if record:
            atomic_write_json(serving / RECORD, record)
        else:
            (serving / RECORD).unlink(missing_ok=True)
        raise
    return {**pending, "server_url": url, "probe_response": response, "latency_s": latency}


def _switch(cfg: ServingConfig, ws: Workspace, record: dict[str, Any], proxy: dict[str, Any],
            new: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Point the proxy at the new server, then drain and stop the old one."""
    token = _token(ws)
    rollout.admin(proxy["endpoint"], token, "switch", {"upstream": new["server_url"]})
    atomic_write_json(ws.serving_dir / RECORD, {**base, **new, "proxy": proxy, "endpoint": proxy["endpoint"]})
    old_url = record.get("server_url")
    if old_url and old_url != new["server_url"]:
        drain_s = cfg.server.drain_timeout_s
        rollout.admin(proxy["endpoint"], token, "drain", {"upstream": old_url, "timeout_s": drain_s}, timeout_s=drain_s)
    if _live(record, "server"):
        rollout.terminate(int(record["pid"]), grace_s=cfg.server.drain_timeout_s + 5)
    Path(record["ready_file"]).unlink(missing_ok=True)
    return proxy


def _start_proxy(cfg: ServingConfig, ws: Workspace, new: dict[str, Any], port: int) -> dict[str, Any]:
    serving = ws.serving_dir
    ready, log, token_file = serving / "proxy-ready.json", serving / "proxy.log", serving / "proxy.token"
    ready.unlink(missing_ok=True)
    rollout.new_token(token_file)
    command = rollout.proxy_command(new["server_url"], cfg.server.host, port, ready, serving / CONFIG, token_file)
    proc = rollout.spawn(command, log, ws)
    try:
        endpoint = rollout.wait_ready(proc, ready, log, cfg.server.startup_timeout_s, "proxy")
    except BaseException:
        rollout.terminate(proc.pid)
        rollout.terminate(new["pid"])
        raise
    return {"pid": proc.pid, "ready_file": str(ready), "log": str(log), "endpoint": endpoint,
            "host": cfg.server.host, "port": int(endpoint.rsplit(":", 1)[1])}


def _unchanged(record: dict[str, Any], cfg: ServingConfig, ws: Workspace) -> DeployResult:
    endpoint = record["endpoint"]
    started = time.perf_counter()
    rollout.health(endpoint)
    release = record["release"]
    result = DeployResult(endpoint, record["model_name"], int(record["pid"]), cfg.probe_prompt, "",
                          time.perf_counter() - started, record["model_ref"], "unchanged", release["version"],
                          int(record["proxy"]["pid"]), release)
    ws.write_state("deploy", result.as_dict())
    return result


def _live(record: dict[str, Any] | None, part: str) -> dict[str, Any] | None:
    """The record's proxy, server or pending server when that process is alive and ours; else None."""
    if record is None:
        return None
    entry = record if part == "server" else record.get(part)
    if not isinstance(entry, dict) or "pid" not in entry:
        return None
    module = PROXY if part == "proxy" else SERVER
    return entry if rollout.ours(int(entry["pid"]), module, str(entry.get("ready_file", ""))) else None


def _stop_record(record: dict[str, Any]) -> bool:
    """Stop every live process of ``record``: the proxy first (no new requests), then the servers."""
    stopped = False
    for part in ("proxy", "server", "pending"):
        entry = _live(record, part)
        if entry is not None:
            rollout.terminate(int(entry["pid"]))
            Path(str(entry["ready_file"])).unlink(missing_ok=True)
            stopped = True
    return stopped


def _keeps_port(cfg: ServingConfig, proxy: dict[str, Any]) -> bool:
    """Whether the running proxy listens where ``cfg`` asks (port 0: wherever it already is)."""
    return cfg.server.port in (0, int(proxy["port"])) and cfg.server.host == proxy["host"]


def _digest(cfg: ServingConfig, model_name: str) -> str:
    """The serving config as the server sees it; the port is the proxy's business, compared on its own."""
    data = cfg.model_dump(mode="json")
    data["server"].pop("port", None)
    return hashlib.sha256(json.dumps([data, model_name], sort_keys=True).encode()).hexdigest()[:16]


def _token(ws: Workspace) -> str:
    return (ws.serving_dir / "proxy.token").read_text().strip()


def _prune(serving: Path, generation: int) -> None:
    """Keep the files of this generation and the one before (its log explains a roll); older ones go."""
    for path in serving.glob("*-*.*"):
        stem, _, number = path.stem.rpartition("-")
        if stem in ("server", "ready", "release") and number.isdigit() and int(number) < generation - 1:
            path.unlink(missing_ok=True)
