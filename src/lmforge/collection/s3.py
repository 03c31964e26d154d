"""The ``s3`` source: objects under a bucket prefix, through boto3, in any format :mod:`formats` reads.

Credentials come from the standard AWS chain (environment, shared config and credentials files,
instance or container roles); the source config has no field for them, and nothing here prints,
logs or stores them (error messages carry S3's error code and message only). ``endpoint_url`` (or
``AWS_ENDPOINT_URL``) points at an S3-compatible store. The listing is paginated; an object whose
ETag matches the last run is not downloaded. Large listings are split into work shards read in
parallel (a process pool, or Ray workers that each create their own client); each object streams
into a spooled temporary file, so memory stays bounded by the shard, not the prefix.
"""

from __future__ import annotations

import fnmatch
import hashlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from lmforge.collection.formats import FormatOptions, documents_from_stream, is_supported
from lmforge.collection.parallel import choose_backend, chunked, run_chunks
from lmforge.collection.types import Fingerprint, SourceContext, Tally, Unit
from lmforge.config.data import S3Source
from lmforge.core.errors import DataError

_SPOOL_BYTES = 16 * 2**20  # objects up to this size stay in memory, larger ones spill to a temp file

S3Object = tuple[str, int, str]  # key, size, etag


def make_client(cfg: S3Source) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config)


def s3_error(exc: Exception, cfg: S3Source) -> DataError:
    """Our error (cause and fix) for a failed listing; never includes credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"s3://{cfg.bucket}/{cfg.prefix}" + (f" at {cfg.endpoint_url}" if cfg.endpoint_url else "")
    if isinstance(exc, NoCredentialsError):
        return DataError(f"no AWS credentials found for {where}",
                         "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (never in the config file)")
    if isinstance(exc, EndpointConnectionError):
        return DataError(f"cannot reach the S3 endpoint for {where}", "check endpoint_url / AWS_ENDPOINT_URL and the network")
    code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else type(exc).__name__
    if code == "NoSuchBucket":
        return DataError(f"bucket {cfg.bucket} does not exist ({where})", "fix data.sources[].bucket or endpoint_url")
    if code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return DataError(f"access denied listing {where} ({code})",
                         "grant s3:ListBucket and s3:GetObject on the prefix to these credentials, or use others")
    return DataError(f"listing {where} failed: {code}: {exc}", "check the bucket, prefix and credentials")


def download(client: Any, bucket: str, key: str, out: IO[bytes]) -> str:
    """Stream one object into ``out`` (then rewound); returns its SHA-256. Raises botocore's errors."""
    digest = hashlib.sha256()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for block in body.iter_chunks(1 << 20):
        digest.update(block)
        out.write(block)
    out.seek(0)
    return digest.hexdigest()


def read_s3_chunk(job: tuple[S3Source, FormatOptions, list[S3Object]]) -> tuple[list[Unit], Tally]:
    """Download and read one work shard of objects (in this thread, a pool worker or on Ray)."""
    from botocore.exceptions import BotoCoreError, ClientError

    cfg, opts, objects = job
    client = make_client(cfg)
    tally = Tally()
    units = []
    for key, size, etag in objects:
        uri = f"s3://{cfg.bucket}/{key}"
        if size > opts.max_bytes:
            tally.skip("too_large", uri, f"{size} bytes > max_file_bytes {opts.max_bytes}")
            continue
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            try:
                digest = download(client, cfg.bucket, key, spool)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                tally.skip(f"s3_{error.get('Code', 'error')}", uri, str(error.get("Message", ""))[:200])
                continue
            except BotoCoreError as exc:
                tally.skip("unreachable", uri, f"{type(exc).__name__}: {exc}")
                continue
            name = key.rsplit("/", 1)[-1]
            docs = list(documents_from_stream(name, spool, uri, opts, tally))
        units.append(Unit(uri, Fingerprint(digest, etag=etag, size=size), docs))
    return units, tally


class S3Objects:
    def __init__(self, cfg: S3Source) -> None:
        self.cfg = cfg
        self.opts = FormatOptions.of(cfg)

    def units(self, ctx: SourceContext) -> Iterator[Unit]:
        objects = self.listing(ctx.tally)
        ctx.expect(len(objects))
        changed = []
        for key, size, etag in objects:
            uri = f"s3://{self.cfg.bucket}/{key}"
            prior = ctx.known(uri)
            if prior is not None and etag and prior.fingerprint.etag == etag:
                yield Unit(uri, prior.fingerprint, None)
            else:
                changed.append((key, size, etag))
        par = ctx.parallel
        chunks = chunked(changed, [size for _, size, _ in changed], par.chunk_files, par.chunk_bytes)
        jobs = [(self.cfg, self.opts, chunk) for chunk in chunks]
        for units, tally in run_chunks(read_s3_chunk, jobs, choose_backend(par, len(changed)), par.workers,
                                       par.ray_address):
            ctx.tally.merge(tally)
            yield from units

    def listing(self, tally: Tally) -> list[S3Object]:
        """(key, size, etag) of the objects the config selects; unreadable types are counted in ``tally``."""
        from botocore.exceptions import BotoCoreError, ClientError

        objects: list[S3Object] = []
        try:
            pages = make_client(self.cfg).get_paginator("list_objects_v2").paginate(Bucket=self.cfg.bucket,
                                                                                    Prefix=self.cfg.prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith("/") or not self._included(key, tally):
                        continue
                    objects.append((key, int(item["Size"]), str(item.get("ETag", "")).strip('"')))
                    if self.cfg.max_objects and len(objects) >= self.cfg.max_objects:
                        return objects
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, self.cfg) from None
        return objects

    def _included(self, key: str, tally: Tally) -> bool:
        name = key.rsplit("/", 1)[-1]
        relative = key[len(self.cfg.prefix):].lstrip("/")

        def matches(patterns: list[str]) -> bool:
            return any(fnmatch.fnmatch(relative if "/" in p else name, p) for p in patterns)

        if not matches(self.cfg.include) or matches(self.cfg.exclude):
            return False
        if not is_supported(name):
            tally.skip("unsupported_format", f"s3://{self.cfg.bucket}/{key}", "no reader for this object type")
            return False
        return True
