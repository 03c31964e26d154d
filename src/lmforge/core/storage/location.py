"""Where a store lives: a workspace URL or path parsed into a pyarrow filesystem and a root in it,
and the store's errors translated into ones that name the setting and the fix.

Which filesystem serves which scheme, and why:
- a path or ``file://``: pyarrow's local filesystem (writes then go through core.workspace's helpers);
- ``s3://``: pyarrow's S3 filesystem. s3fs is not used: its aiobotocore pins an older botocore than
  the boto3 lmforge's collect stage needs. Credentials come from the AWS SDK's standard chain
  (environment, AWS_PROFILE and the shared files, web identity, container or instance role: the
  sources boto3 reads), never from a config; the endpoint from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (S3-compatible stores such as MinIO), the region from boto3's session;
- ``gs://``: pyarrow's GCS filesystem (Application Default Credentials);
- ``az://``: pyarrow's Azure filesystem, account from ``AZURE_STORAGE_ACCOUNT_NAME``;
- any other scheme fsspec knows (``memory://``, ``gcs``/``abfs`` through their packages...): fsspec's
  filesystem behind pyarrow's FSSpecHandler, so everything above this module sees one interface.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from lmforge.core.errors import ConfigError
from lmforge.core.workspace import is_url

SETTING = "LMFORGE_HOME"
_BUCKETED = ("s3", "gs", "az")  # the first path part is a bucket (container) that must exist
_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
# The AWS SDK's error names (pyarrow quotes them: "AWS Error ACCESS_DENIED during ...").
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN",
           "INVALID_CLIENT_TOKEN_ID", "MISSING_AUTHENTICATION_TOKEN", "Forbidden", "PermissionDenied",
           "AuthorizationFailure", "AuthenticationFailed")
_MISSING = ("NO_SUCH_BUCKET", "NoSuchBucket", "ContainerNotFound", "bucket does not exist")
_UNREACHABLE = ("NETWORK_CONNECTION", "Couldn't connect", "curlCode: 7", "Connection refused",
                "Could not resolve host")


class StorageError(ConfigError):
    """The workspace's store is misnamed, missing, unreachable or refuses our credentials."""


@dataclass(frozen=True)
class Location:
    """A store's address: ``scheme`` (``file``, ``s3``, ``memory``...), ``root`` inside its
    filesystem (``/abs/dir``, ``bucket/prefix``) and ``url`` as the user wrote it (no credentials)."""

    scheme: str
    root: str
    url: str

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def bucket(self) -> str | None:
        """The bucket (container) that must exist for the store to work, if the scheme has one."""
        return self.root.split("/", 1)[0] if self.scheme in _BUCKETED else None

    def join(self, key: str) -> str:
        """The filesystem path of ``key`` (a '/'-separated key relative to the root)."""
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def uri(self, key: str = "") -> str:
        """``key`` as a URL other tools take (Ray's storage_path, MLflow's artifact location)."""
        base = self.root if self.is_local else self.url
        return f"{base.rstrip('/')}/{key}" if key else base


def parse(location: str | os.PathLike[str], setting: str = SETTING) -> Location:
    """Parse a workspace location; a ConfigError names ``setting`` when it cannot be a store."""
    text = str(location).strip()
    if not is_url(text):
        path = text[len("file://"):] if text.lower().startswith("file://") else text
        resolved = Path(path or ".").expanduser().resolve()
        return Location("file", str(resolved), str(resolved))
    parts = urlsplit(text)
    if parts.username or parts.password:
        raise StorageError(f"{setting} holds credentials in its URL (user:password@)",
                           f"remove them from {setting}; the store's standard credential chain supplies them")
    if parts.query or parts.fragment:
        raise StorageError(f"{setting}={text} has a query or fragment ('?', '#'), which a store location cannot hold",
                           f"set {setting} to scheme://bucket/prefix only")
    scheme = _ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    url = f"{scheme}://{parts.netloc}{parts.path}".rstrip("/")
    if scheme in _BUCKETED:
        if not parts.netloc:
            raise StorageError(f"{setting}={text} names no bucket",
                               f"set {setting}={scheme}://BUCKET/PREFIX")
        return Location(scheme, f"{parts.netloc}{parts.path}".rstrip("/"), url)
    return Location(scheme, _fsspec_class(scheme, text, setting)._strip_protocol(url), url)


def filesystem(location: Location, setting: str = SETTING) -> pafs.FileSystem:
    """The pyarrow filesystem that serves ``location`` (connects to nothing yet)."""
    if location.is_local:
        return pafs.LocalFileSystem()
    if location.scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return pafs.S3FileSystem(endpoint_override=endpoint, region=_aws_region(location, endpoint),
                                 allow_bucket_creation=False, allow_bucket_deletion=False)
    if location.scheme == "gs":
        return pafs.GcsFileSystem()
    if location.scheme == "az":
        account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        if not account:
            raise StorageError(f"{setting}={location.url} needs an Azure storage account name",
                               "set AZURE_STORAGE_ACCOUNT_NAME (credentials come from Azure's default chain)")
        return pafs.AzureFileSystem(account_name=account)
    fs = _fsspec_class(location.scheme, location.url, setting)()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _aws_region(location: Location, endpoint: str | None) -> str:
    import boto3

    region = boto3.session.Session().region_name
    if region:
        return region
    if endpoint:  # S3-compatible servers mostly ignore the region; AWS itself needs the right one
        return "us-east-1"
    try:
        return pafs.resolve_s3_region(location.bucket or "")
    except OSError as exc:
        raise storage_error(exc, location, "find the bucket's region") from None


def _fsspec_class(scheme: str, text: str, setting: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise StorageError(f"{setting}={text}: unknown storage scheme '{scheme}://'",
                           f"use a local path or one of s3://, gs://, az://, memory:// "
                           f"(or another scheme fsspec knows) in {setting}") from None
    except ImportError as exc:
        raise StorageError(f"{setting}={text}: the '{scheme}://' filesystem's package is not installed ({exc})",
                           f"pip install the package fsspec names above, or choose another {setting}") from None


def storage_error(exc: OSError, location: Location, action: str, setting: str = SETTING) -> Exception:
    """The LmforgeError for a store's refusal (missing bucket, denied, unreachable), else ``exc`` itself.

    The message quotes the store's own words after our explanation; the AWS SDK never includes
    the secret key in them.
    """
    text = str(exc)
    where = f"{setting}={location.url}"
    if any(word in text for word in _MISSING):
        return StorageError(f"{where}: the bucket '{location.bucket}' does not exist (while trying to {action})",
                            f"create the bucket, or point {setting} at one that exists")
    if any(word in text for word in _DENIED):
        return StorageError(f"{where}: the store refused our credentials (while trying to {action}): {_first_line(text)}",
                            "check the credentials the standard chain finds (for S3: AWS_ACCESS_KEY_ID, "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and that they may "
                            f"read, write and delete under {location.url}")
    if any(word in text for word in _UNREACHABLE):
        return StorageError(f"{where}: the store cannot be reached (while trying to {action}): {_first_line(text)}",
                            "check AWS_ENDPOINT_URL (or the store's endpoint) and the network")
    return exc


@contextlib.contextmanager
def translated(location: Location, action: str, setting: str = SETTING) -> Iterator[None]:
    """Run a block whose store errors become StorageErrors; other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        mapped = storage_error(exc, location, action, setting)
        if mapped is exc:
            raise
        raise mapped from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""
