"""Admin routes: LoRA adapters loaded and unloaded while serving (vLLM's route names and bodies).

``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` loads a peft LoRA adapter from a directory
inside ``serving.lora.adapter_roots`` or from the registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``);
it is then listed by ``/v1/models`` (``parent``: the base) and requests with ``model: <lora_name>`` use it.
``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` forgets it (a 400 naming ``lora_name`` while any
request uses it); its name then answers 404 ``model_not_found``. Both need the admin key
(``Authorization: Bearer <key>``, the key in the environment variable ``serving.server.admin_key_env``,
``LMFORGE_ADMIN_KEY`` by default): the API key is every client's, and a load reads the server's disk, so
without an admin key the routes answer 403 naming the fix. Which adapters sit on the device, and the swaps,
are ``serving/adapters/runtime.py``'s.

A loaded adapter's weights may leave CPU memory (``serving.lora.max_cpu_loras``, least recently used
first); :func:`adapter_held`, around the queueing of a request, reads them again from the source recorded
at load: its directory, or the registry *version* an alias named then (an alias moved since is not
followed: the adapter is what was loaded). A source gone or changed answers 503 naming ``model``.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import os
from collections.abc import AsyncIterator, Callable
from typing import cast

import anyio.to_thread
from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel, ConfigDict, Field

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import LmforgeError
from lmforge.core.workspace import Workspace
from lmforge.serving.adapters.lora_slots import LoraAdapter, read_adapter
from lmforge.serving.adapters.runtime import AdapterPool, check_runtime
from lmforge.serving.adapters.sources import from_registry, inside_roots
from lmforge.serving.api.errors import ApiError
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.backends.tensor_parallel import TensorParallelBackend
from lmforge.serving.engine.engine import Engine
from lmforge.serving.model.types import LlamaCausalLM


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256, pattern=r"^\S(.*\S)?$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's body has it; names are what lmforge keys adapters by


class LoraAdapterStatus(BaseModel):
    object: str = "lora_adapter"
    id: str
    parent: str
    loaded: bool


def _refused(exc: LmforgeError, param: str, status: int = 400, code: str = "invalid_value") -> ApiError:
    return ApiError(status, f"{exc.cause}; {exc.fix}", param=param, code=code)


def add_admin_routes(app: FastAPI, engine: Engine, model_name: str, cfg: ServingConfig) -> None:
    """The load and unload routes of ``engine``'s LoRA adapters, behind the admin key."""
    env = cfg.server.admin_key_env
    key = os.environ.get(env) or ""

    async def authorize_admin(authorization: str | None = Header(None)) -> None:
        if not key:
            raise ApiError(403, f"adapter loading and unloading need an admin key, and {env} is not set on the "
                           f"server; set {env} (clients then send 'Authorization: Bearer <admin key>')",
                           code="admin_key_unset", type_="permission_error")
        scheme, _, token = (authorization or "").strip().partition(" ")
        sent = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(sent, key.encode()):
            raise ApiError(401, f"missing or incorrect admin key; send 'Authorization: Bearer <the key in {env}>'",
                           code="invalid_api_key")

    def pool() -> AdapterPool:
        backend = engine.backend
        if not isinstance(backend, (PagedBackend, TensorParallelBackend)):
            raise ApiError(400, f"LoRA adapters are served by the paged engine only, and this server runs the "
                           f"{backend.name} one; serve a Llama-family model with serving.runtime.engine: auto",
                           param="lora_name", code="lora_loading_off")
        try:
            return check_runtime(backend.lora)
        except LmforgeError as exc:
            raise _refused(exc, "lora_name", code="lora_loading_off") from None

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize_admin)])
    async def load(body: LoadLoraAdapterRequest) -> LoraAdapterStatus:
        adapters = pool()
        name = body.lora_name
        with engine.admission_held():
            if name == model_name:
                raise ApiError(400, f"lora_name {name!r} is the base model's served name; pick another",
                               param="lora_name", code="invalid_value")
            try:
                adapters.check(name)
            except LmforgeError as exc:
                raise _refused(exc, "lora_name") from None
        try:  # reading (or downloading) the weights takes a while: off the event loop, outside the engine's lock
            adapter, source = await anyio.to_thread.run_sync(_read, body, cfg, engine)
        except LmforgeError as exc:
            raise _refused(exc, "lora_path") from None
        misfit = adapters.slots.misfit(adapter)
        if misfit is not None:
            raise ApiError(400, f"{misfit}; load an adapter that fits serving.lora.max_rank and serving.lora."
                           "target_modules, or raise those (a restart)", param="lora_path", code="adapter_does_not_fit")
        with engine.admission_held():
            try:
                adapters.add(adapter, source, queued_ids(engine))
            except LmforgeError as exc:  # another load of the same name, or the pool filled, meanwhile
                raise _refused(exc, "lora_name") from None
        return LoraAdapterStatus(id=name, parent=model_name, loaded=True)

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize_admin)])
    async def unload(body: UnloadLoraAdapterRequest) -> LoraAdapterStatus:
        adapters = pool()
        name = body.lora_name
        with engine.admission_held():
            adapter_id = adapters.ids.get(name)
            if adapter_id is None:
                raise ApiError(404, f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(adapters.ids) or 'none'})",
                               param="lora_name", code="model_not_found")
            using = adapters.queued_or_running(adapter_id, queued_ids(engine))
            if using:
                raise ApiError(400, f"LoRA adapter {name!r} is in use by {using} running or waiting request(s); "
                               "unload it once they finish", param="lora_name", code="adapter_in_use")
            adapters.remove(name)
        return LoraAdapterStatus(id=name, parent=model_name, loaded=False)


def queued_ids(engine: Engine) -> list[int]:
    """The adapter ids of the requests waiting for admission (hold the engine's admission lock)."""
    return [r.adapter for r in engine.scheduler.waiting] + [s.request.adapter for s in engine.scheduler.preempted]


@contextlib.asynccontextmanager
async def adapter_held(engine: Engine, name: str | None) -> AsyncIterator[None]:
    """Queue requests of LoRA adapter ``name`` inside this block: its weights are in CPU memory (read again
    from their source, in a worker thread, if they were dropped) and stay there until the block ends, by
    when the requests are queued (a queued adapter's weights are never dropped). 503 naming ``model`` when
    the source is gone or holds other weights now."""
    pool = engine.backend.lora if isinstance(engine.backend, (PagedBackend, TensorParallelBackend)) else None
    if name is None or pool is None or not pool.runtime:
        yield
        return
    with engine.admission_held():
        adapter_id = pool.ids.get(name)
        if adapter_id is None:  # unloaded meanwhile: the submit answers model_not_found
            must_read = False
        else:
            must_read = pool.pin(adapter_id)
    try:
        if must_read and adapter_id is not None:
            try:
                adapter = await anyio.to_thread.run_sync(pool.sources[adapter_id])
                with engine.admission_held():
                    pool.restore(adapter_id, adapter, queued_ids(engine))
            except LmforgeError as exc:
                raise _refused(exc, "model", status=503, code="adapter_unavailable") from None
        yield
    finally:
        if adapter_id is not None:
            with engine.admission_held():
                pool.unpin(adapter_id)


def _read(body: LoadLoraAdapterRequest, cfg: ServingConfig, engine: Engine) -> tuple[LoraAdapter, Callable[[], LoraAdapter]]:
    """The adapter ``body`` names, read and checked against the served base (a worker thread), and how to read
    it again: from the same directory, or from the registry version the URI resolved to now."""
    # The paged backend (checked by the caller) serves Llama-family models only.
    model = cast(LlamaCausalLM, engine.model)
    if body.lora_path.startswith("models:/"):
        ws = Workspace.from_env()
        adapter_dir, pinned = from_registry(body.lora_path, ws)

        def source() -> LoraAdapter:
            return read_adapter(body.lora_name, from_registry(pinned, ws)[0], model, body.lora_path)
    else:
        adapter_dir = inside_roots(body.lora_path, cfg.lora.adapter_roots)
        source = functools.partial(_reread_dir, body.lora_name, body.lora_path, cfg, model)
    return read_adapter(body.lora_name, adapter_dir, model, body.lora_path), source


def _reread_dir(name: str, lora_path: str, cfg: ServingConfig, model: LlamaCausalLM) -> LoraAdapter:
    """A directory adapter read again, checked against the roots again (a link may have moved since)."""
    return read_adapter(name, inside_roots(lora_path, cfg.lora.adapter_roots), model, lora_path)
