"""Locations that stage hand-offs record (``model_dir`` in the ``train`` state, an eval report's path),
read back as local files on any machine.

A hand-off names an output the way its writer saw it: on a local workspace a path; on an object-store
workspace the writer's side of the home (``<cache>/homes/<id>/runs/<run>/model``, a path on the
machine that wrote it) or, from the stages after training, the object's URL
(``s3://bucket/prefix/eval/x.json``). :func:`recorded_key` turns any of these into the store key, so
a stage on another machine (another ``LMFORGE_CACHE``) still finds the output; :func:`recorded_dir`
and :func:`recorded_file` give local copies through the read cache.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from lmforge.core.storage.store import open_store
from lmforge.core.workspace import Workspace


def recorded_key(ws: Workspace, where: str | Path) -> str | None:
    """The store key of ``where`` on the remote workspace ``ws``; None when it is not inside it."""
    text = str(where)
    if ws.url is not None and (text == ws.url or text.startswith(ws.url + "/")):
        return text[len(ws.url):].strip("/")
    parts = PurePosixPath(Path(text).as_posix()).parts
    # The writer's side of the home is <its cache>/homes/<id>, <id> a digest of the URL: the same
    # id on every machine, whatever its cache directory.
    for i in range(len(parts) - 1):
        if parts[i] == "homes" and parts[i + 1] == ws.home.name:
            return "/".join(parts[i + 2:])
    return None


def recorded_name(ws: Workspace, where: Path) -> str:
    """How a hand-off names ``where`` (a path under ``ws.home``): the URL on a store, else the path."""
    if ws.url is None:
        return str(where)
    return open_store(ws).uri(where)


def recorded_dir(ws: Workspace, where: str | Path) -> Path:
    """A local directory with the files of ``where``: itself on a local workspace or outside the
    workspace, else a cached copy of the committed directory it is or lies in (FileNotFoundError
    names it when there is none)."""
    key = recorded_key(ws, where) if ws.is_remote else None
    if key is None:
        return Path(where)
    # A directory inside a committed one (the train stage commits runs/<id> with model/ in it) is
    # read as part of it: the marker of the nearest committed ancestor vouches for its files.
    store, parts = open_store(ws), key.split("/")
    for depth in range(len(parts), 0, -1):
        if store.is_committed("/".join(parts[:depth])):
            return store.cached_dir("/".join(parts[:depth])).joinpath(*parts[depth:])
    raise FileNotFoundError(f"{store.uri(key)} is not a committed directory nor inside one")


def recorded_file(ws: Workspace, where: str | Path) -> Path:
    """A local file with the content of ``where`` (see :func:`recorded_dir`)."""
    key = recorded_key(ws, where) if ws.is_remote else None
    if key is None:
        return Path(where)
    return open_store(ws).cached_path(key)
