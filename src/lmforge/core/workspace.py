"""The workspace: every file a run writes lives under one home directory.

``LMFORGE_HOME`` (default ``./.lmforge``) is resolved once; two homes never share a path, so two
runs with two homes never interfere. All writers go through :func:`atomic_write` or
:func:`atomic_dir` so that a crash leaves either the old output or the new one, never half of it.

``LMFORGE_HOME`` may also be a URL (``s3://bucket/prefix``, ``gs://``, ``az://``, ``memory://``...):
then :attr:`Workspace.url` holds it, every output goes through :mod:`lmforge.core.storage`, and
:attr:`Workspace.home` is only this machine's side of it (Ray's temp dir, logs), under the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from lmforge.core.errors import ConfigError

DEFAULT_HOME = ".lmforge"
CACHE_ENV = "LMFORGE_CACHE"
# scheme://... ; one letter before ':' is a Windows drive, not a scheme.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")


def is_url(location: str) -> bool:
    """True when ``location`` names a filesystem by scheme (``s3://``...) rather than a local path."""
    return _URL.match(location) is not None and not location.lower().startswith("file://")


def cache_root() -> Path:
    """This machine's cache (``LMFORGE_CACHE``, default ``~/.cache/lmforge``): copies of remote data, never outputs."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/lmforge").expanduser().resolve()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class Workspace:
    """Named locations inside one home directory. Creating it touches nothing on disk."""

    home: Path
    # The home as a URL when it is on an object store; ``home`` is then this machine's side of it.
    url: str | None = None

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> Workspace:
        chosen = str(home or os.environ.get("LMFORGE_HOME") or DEFAULT_HOME)
        if is_url(chosen):
            url = chosen.rstrip("/")
            if "@" in urlsplit(url).netloc:  # never keep a secret where reprs and logs can show it
                raise ConfigError(
                    "LMFORGE_HOME holds credentials in its URL (user:password@)",
                    "remove them from LMFORGE_HOME and use the store's standard credential chain "
                    "(for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)")
            local = cache_root() / "homes" / hashlib.sha256(url.encode()).hexdigest()[:16]
            return cls(local, url)
        if chosen.lower().startswith("file://"):
            chosen = chosen[len("file://"):]
        return cls(Path(chosen).expanduser().resolve())

    @property
    def is_remote(self) -> bool:
        """True when the workspace lives on an object store (outputs go through lmforge.core.storage)."""
        return self.url is not None

    @property
    def location(self) -> str:
        """The workspace as a user names it: its URL, or its home directory."""
        return self.url or str(self.home)

    def shown(self, path: Path) -> str:
        """How a user finds ``path`` (under ``home``): its URL on an object store, else the path itself."""
        if self.url is None:
            return str(path)
        return f"{self.url}/{path.relative_to(self.home).as_posix()}"

    # Data, in the order the pipeline produces it.
    @property
    def data_dir(self) -> Path:
        """The datasets below, and the curate stage's scratch space (beside its output, for one rename)."""
        return self.home / "data"

    @property
    def collect_cache_dir(self) -> Path:
        """Collection's scratch space: downloads and partial units a rerun resumes from."""
        return self.home / "cache" / "collect"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def curated_dir(self) -> Path:
        return self.data_dir / "curated"

    @property
    def curated_versions_dir(self) -> Path:
        """Each curated version's dedup keys and signatures, which later versions dedup against."""
        return self.data_dir / "curated-versions"

    @property
    def sft_dir(self) -> Path:
        return self.data_dir / "sft"

    @property
    def preferences_dir(self) -> Path:
        """The preference set (prompt, chosen, rejected): train.jsonl, test.jsonl and report.json."""
        return self.data_dir / "preferences"

    @property
    def curated_sft_dir(self) -> Path:
        """The curated SFT set: train.jsonl, test.jsonl and report.json (which names the collected files it came from)."""
        return self.data_dir / "curated-sft"

    @property
    def curated_preferences_dir(self) -> Path:
        """The curated preference set, laid out like curated_sft_dir."""
        return self.data_dir / "curated-preferences"

    @property
    def validation_dir(self) -> Path:
        return self.data_dir / "validation"

    @property
    def tokenizer_dir(self) -> Path:
        return self.home / "tokenizer"

    @property
    def tokenized_dir(self) -> Path:
        """Tokenized datasets, one folder per content digest, and ``latest.json`` naming the newest."""
        return self.data_dir / "tokenized"

    @property
    def runs_dir(self) -> Path:
        """Training runs: final model directories and results, one folder per run."""
        return self.home / "runs"

    @property
    def checkpoints_dir(self) -> Path:
        """Checkpoints of unfinished training runs, one folder per run id (removed once it succeeds)."""
        return self.home / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.home / "eval"

    @property
    def state_dir(self) -> Path:
        """Hand-offs between stages run separately (latest train/eval/register results)."""
        return self.home / "state"

    # Services' own state.
    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts_uri(self) -> str:
        return (self.mlflow_dir / "artifacts").as_uri()

    @property
    def ray_dir(self) -> Path:
        return self.home / "ray"

    @property
    def prefect_dir(self) -> Path:
        return self.home / "prefect"

    @property
    def serving_dir(self) -> Path:
        return self.home / "serving"

    @property
    def serve_app_record(self) -> Path:
        """The Ray Serve application deployed from this workspace (``serving/ray_serve``), which
        ``lmforge stack down`` forgets when the stack's Ray head takes the application down with it."""
        return self.serving_dir / "ray_serve.json"

    @property
    def logs_dir(self) -> Path:
        """Logs of the services `lmforge ui` starts."""
        return self.home / "logs"

    @property
    def ui_file(self) -> Path:
        """The running `lmforge ui`'s URLs and process id."""
        return self.home / "ui.json"

    def ensure(self) -> Workspace:
        self.home.mkdir(parents=True, exist_ok=True)
        return self

    # Stage hand-offs as small JSON documents; on an object store they are objects under ``state/``.
    def write_state(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.state_dir / f"{name}.json"
        if self.is_remote:
            _remote_state().write(self, path, payload)
        else:
            atomic_write_json(path, payload)
        return path

    def read_state(self, name: str) -> dict[str, Any] | None:
        path = self.state_dir / f"{name}.json"
        if self.is_remote:
            return _remote_state().read(self, path)
        if not path.exists():
            return None
        return json.loads(path.read_text())


class RemoteState(Protocol):
    """How hand-offs of an object-store workspace are read and written (lmforge.core.storage)."""

    def write(self, ws: Workspace, path: Path, payload: dict[str, Any]) -> None: ...

    def read(self, ws: Workspace, path: Path) -> dict[str, Any] | None: ...


# The storage layer imports this module, so this one cannot import it: it installs its RemoteState
# here when it is imported, as every stage that works on a remote workspace does.
_REMOTE_STATE: list[RemoteState] = []


def install_remote_state(io: RemoteState) -> None:
    """Called once by lmforge.core.storage: hand-offs of a remote workspace go through its store."""
    _REMOTE_STATE[:] = [io]


def _remote_state() -> RemoteState:
    if not _REMOTE_STATE:
        raise RuntimeError("import lmforge.core.storage before using an object-store workspace's state")
    return _REMOTE_STATE[0]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; outputs are shared with servers and containers like any file.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    On any exception the temporary directory is removed and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
