"""One object-store API over s3:// URIs and local paths (file:///x or /x).

The dataset, the pretrained weights, the checkpoints and the outputs all go through `ObjectStore`,
so every storage failure becomes a `TrainerError` with the exit code that tells the operator whether
a retry can help: an unreachable or throttling endpoint is TRANSIENT, refused credentials or a
missing bucket are ACCESS_DENIED, a missing object is INVALID_DATA unless the caller says otherwise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError

CREDENTIALS_FIELD = "spec.dataset.s3.credentialsSecret"
# Above this size uploads go in parts of this size; `local_etag` mirrors it so unchanged files
# are recognised by ETag whichever way they were uploaded.
MULTIPART_CHUNK_BYTES = 64 * 1024 * 1024
_READ_CHUNK_BYTES = 1024 * 1024

_ACCESS_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "InvalidToken", "AllAccessDisabled", "AccountProblem",
                        "403", "Forbidden", "InvalidClientTokenId", "UnrecognizedClientException",
                        "XAdminUserNotFound"}  # versitygw: unknown access key (a 404)
# Checked before the 403 status that RequestTimeTooSkewed and ExpiredToken come with: a node's
# clock that drifted, or short-lived credentials (IRSA, STS) that expired mid-run, are fixed by
# a retry (a pod that may land elsewhere, with credentials fetched anew), not by the user.
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeTooSkewed", "ExpiredToken", "ServiceUnavailable", "InternalError",
                    "RequestLimitExceeded", "TooManyRequests", "503", "500", "502", "504"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class ObjectNotFound(TrainerError):
    """A key or file that does not exist. Callers that expect it (a first checkpoint) catch it;
    others let it end the run as INVALID_DATA or re-raise it with their own exit code."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    key: str  # path relative to the listed prefix, with "/" separators
    size: int
    etag: str  # S3: the ETag without quotes; local: size and mtime, enough to notice a change


@dataclass
class TransferStats:
    """Requests that moved object data, counted so tests and reports can see cache hits."""

    list_requests: int = 0
    gets: int = 0
    bytes_downloaded: int = 0
    puts: int = 0
    bytes_uploaded: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise TrainerError(ExitCode.INVALID_SPEC, f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """file:///x or /x -> Path("/x")."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if uri.startswith("/"):
        return Path(uri)
    raise TrainerError(ExitCode.INVALID_SPEC,
                       f"{uri!r} is neither s3://bucket/prefix, file:///path nor an absolute path")


def join_uri(base: str, *parts: str) -> str:
    """Join URI segments with single slashes: join_uri("s3://b/p/", "a", "x.png") ->
    "s3://b/p/a/x.png". A trailing slash on the last part is kept (it marks a prefix)."""
    result = base
    for part in parts:
        if not part:
            continue
        result = result.rstrip("/") + "/" + part.lstrip("/")
    return result


def local_etag(path: Path, chunk_bytes: int = MULTIPART_CHUNK_BYTES) -> str:
    """The ETag S3 gives this file when uploaded by `ObjectStore.upload_file`: the MD5 of the
    content, or for multipart uploads the MD5 of the parts' MD5s followed by "-<parts>"."""
    part_digests = []
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            part_digests.append(hashlib.md5(chunk).digest())
    if len(part_digests) <= 1:
        return (part_digests[0] if part_digests else hashlib.md5(b"").digest()).hex()
    return f"{hashlib.md5(b''.join(part_digests)).hexdigest()}-{len(part_digests)}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def error_from_client_error(error: Exception, uri: str, *, field: str | None = None,
                            operation: str = "access") -> TrainerError:
    """Map a botocore ClientError to the TrainerError a user can act on."""
    response = getattr(error, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    detail = response.get("Error", {}).get("Message") or code
    bucket = split_s3_uri(uri)[0] if is_s3_uri(uri) else uri
    if code == "NoSuchBucket":
        return TrainerError(ExitCode.ACCESS_DENIED,
                            f"bucket {bucket!r} does not exist (while trying to {operation} {uri})",
                            field)
    if code in _TRANSIENT_CODES:
        return _transient(uri, operation, code, detail, field)
    if code in _ACCESS_DENIED_CODES or status == 403:
        return TrainerError(ExitCode.ACCESS_DENIED,
                            f"access denied to {uri} ({code}: {detail}); check the credentials "
                            "in the Secret and the bucket policy", CREDENTIALS_FIELD)
    if code in _MISSING_KEY_CODES or status == 404:
        return ObjectNotFound(ExitCode.INVALID_DATA, f"{uri} does not exist", field)
    if (status or 0) >= 500 or status == 429:
        return _transient(uri, operation, code or status, detail, field)
    return TrainerError(ExitCode.FAILED, f"S3 refused to {operation} {uri} ({code}: {detail})",
                        field)


def _error_code(error: Exception) -> str:
    return str((getattr(error, "response", None) or {}).get("Error", {}).get("Code", ""))


def _transient(uri: str, operation: str, code, detail: str, field: str | None) -> TrainerError:
    return TrainerError(ExitCode.TRANSIENT,
                        f"S3 could not {operation} {uri} right now ({code}: {detail}); retries "
                        "exhausted", field)


def _translate(error: Exception, uri: str, field: str | None, operation: str) -> TrainerError:
    from botocore import exceptions as botocore_errors

    if isinstance(error, TrainerError):
        return error
    if isinstance(error, botocore_errors.ClientError):
        return error_from_client_error(error, uri, field=field, operation=operation)
    if isinstance(error, (botocore_errors.NoCredentialsError,
                          botocore_errors.PartialCredentialsError)):
        return TrainerError(ExitCode.ACCESS_DENIED,
                            f"no S3 credentials found to {operation} {uri}: set "
                            "credentialsSecret or give the pod an AWS identity",
                            CREDENTIALS_FIELD)
    if isinstance(error, (botocore_errors.EndpointConnectionError,
                          botocore_errors.ConnectTimeoutError,
                          botocore_errors.ReadTimeoutError,
                          botocore_errors.ConnectionClosedError,
                          botocore_errors.ResponseStreamingError,
                          botocore_errors.IncompleteReadError,
                          botocore_errors.HTTPClientError,
                          ConnectionError, TimeoutError)):
        return TrainerError(ExitCode.TRANSIENT,
                            f"S3 endpoint unreachable while trying to {operation} {uri}: "
                            f"{error}", field)
    # The transfer manager wraps the cause: a failed multipart upload, or a download whose
    # retries of a broken stream ran out.
    if type(error).__name__ == "RetriesExceededError" and getattr(error, "last_exception", None):
        return _translate(error.last_exception, uri, field, operation)
    upload_failed = error.__cause__ or error.__context__
    if type(error).__name__ == "S3UploadFailedError" and upload_failed is not None:
        return _translate(upload_failed, uri, field, operation)
    return TrainerError(ExitCode.FAILED, f"could not {operation} {uri}: {error}", field)


class ObjectStore:
    """Reads and writes objects named by s3:// URIs or local paths. Thread-safe: the boto3
    client is created once and shared, as boto3 documents clients to be."""

    def __init__(self, s3: dict | None = None, *, page_size: int = 1000,
                 max_attempts: int = 5, connect_timeout: float = 5, read_timeout: float = 60,
                 multipart_chunk_bytes: int = MULTIPART_CHUNK_BYTES, max_concurrency: int = 4):
        self.s3_settings = dict(s3 or {})
        self.page_size = page_size
        self.multipart_chunk_bytes, self.max_concurrency = multipart_chunk_bytes, max_concurrency
        self.stats = TransferStats()
        self._client_options = {"max_attempts": max_attempts, "connect_timeout": connect_timeout,
                                "read_timeout": read_timeout}
        self._client = None
        self._client_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """The S3 endpoint in use ("" for AWS's default), part of cache keys."""
        return self.s3_settings.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL") or ""

    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        style = self.s3_settings.get("addressingStyle") or "Auto"
        if style == "Auto":
            addressing = "path" if self.endpoint else "auto"
        else:
            addressing = style.lower()
        config = Config(
            connect_timeout=self._client_options["connect_timeout"],
            read_timeout=self._client_options["read_timeout"],
            retries={"total_max_attempts": self._client_options["max_attempts"],
                     "mode": "standard"},
            s3={"addressing_style": addressing},
            # Recent botocore adds CRC trailers that some S3-compatible servers reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=64,
        )
        # Empty endpoint: boto3 picks AWS, or AWS_ENDPOINT_URL from the environment.
        return boto3.session.Session().client(
            "s3", endpoint_url=self.s3_settings.get("endpoint") or None,
            region_name=self.s3_settings.get("region") or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=config)

    # ---- listing -------------------------------------------------------------------------

    def list(self, uri: str, *, field: str | None = None) -> list[ObjectInfo]:
        """Every object under the prefix `uri` (treated as a directory), sorted by key."""
        if is_s3_uri(uri):
            return self._list_s3(uri, field)
        root = local_path(uri)
        if root.is_file():
            stat = root.stat()
            return [ObjectInfo(uri, root.name, stat.st_size, _stat_etag(stat))]
        objects = []
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            for name in sorted(files):
                if name.startswith(".tmp-"):
                    continue
                path = Path(directory) / name
                key = path.relative_to(root).as_posix()
                try:
                    stat = path.stat()
                except OSError:
                    continue
                objects.append(ObjectInfo(join_uri(uri, key), key, stat.st_size,
                                          _stat_etag(stat)))
        return sorted(objects, key=lambda info: info.key)

    def _list_s3(self, uri: str, field: str | None) -> list[ObjectInfo]:
        bucket, prefix = split_s3_uri(uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        objects = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size})
            for page in pages:
                self.stats.add(list_requests=1)
                for item in page.get("Contents", []):
                    key = item["Key"][len(prefix):]
                    if not key or key.endswith("/"):
                        continue  # "directory" placeholder objects
                    objects.append(ObjectInfo(f"s3://{bucket}/{item['Key']}", key, item["Size"],
                                              item.get("ETag", "").strip('"')))
        except Exception as error:
            raise _translate(error, uri, field, "list") from error
        return sorted(objects, key=lambda info: info.key)

    # ---- whole objects -------------------------------------------------------------------

    def read_bytes(self, uri: str, *, field: str | None = None) -> bytes:
        if is_s3_uri(uri):
            bucket, key = split_s3_uri(uri)
            try:
                response = self.client.get_object(Bucket=bucket, Key=key)
                data = response["Body"].read()
            except Exception as error:
                raise _translate(error, uri, field, "read") from error
            self.stats.add(gets=1, bytes_downloaded=len(data))
            return data
        path = local_path(uri)
        try:
            return path.read_bytes()
        except Exception as error:
            raise _local_error(error, uri, field, "read") from error

    def write_bytes(self, uri: str, data: bytes, *, field: str | None = None) -> None:
        """Readers see the old object or the new one, never part of it."""
        if is_s3_uri(uri):
            bucket, key = split_s3_uri(uri)
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data)
            except Exception as error:
                raise _translate(error, uri, field, "write") from error
            self.stats.add(puts=1, bytes_uploaded=len(data))
            return
        path = local_path(uri)
        try:
            with _atomic_local_file(path) as file:
                file.write(data)
        except Exception as error:
            raise _local_error(error, uri, field, "write") from error

    def create_bytes(self, uri: str, data: bytes, *, field: str | None = None) -> bool:
        """Write `data` only where no object exists yet: True when written, False when one was
        there. S3: a conditional PUT (If-None-Match: *). A server that ignores the condition
        overwrites instead and answers True: callers that must know read the object back."""
        if is_s3_uri(uri):
            bucket, key = split_s3_uri(uri)
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except Exception as error:
                # 409 ConditionalRequestConflict: another conditional write of the key is in
                # flight; its writer owns it.
                if _error_code(error) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise _translate(error, uri, field, "write") from error
            self.stats.add(puts=1, bytes_uploaded=len(data))
            return True
        path = local_path(uri)
        try:
            with _atomic_local_file(path, replace=False) as file:
                file.write(data)
        except FileExistsError:
            return False
        except Exception as error:
            raise _local_error(error, uri, field, "write") from error
        return True

    def _transfer_config(self):
        """Multipart above one part's size, parts in parallel, at most `max_concurrency` parts
        in memory at once."""
        from boto3.s3.transfer import TransferConfig
        return TransferConfig(multipart_threshold=self.multipart_chunk_bytes + 1,
                              multipart_chunksize=self.multipart_chunk_bytes,
                              max_concurrency=self.max_concurrency, use_threads=True)

    def upload_file(self, path, uri: str, *, field: str | None = None) -> None:
        """Stream a file to `uri` (S3: boto3's transfer manager, multipart when large). Readers
        see the old object or the new one, never part of it."""
        path = Path(path)
        size = path.stat().st_size
        if is_s3_uri(uri):
            bucket, key = split_s3_uri(uri)
            try:
                self.client.upload_file(str(path), bucket, key, Config=self._transfer_config())
            except Exception as error:
                raise _translate(error, uri, field, "write") from error
            self.stats.add(puts=1, bytes_uploaded=size)
            return
        destination = local_path(uri)
        try:
            with _atomic_local_file(destination) as file, open(path, "rb") as source:
                shutil.copyfileobj(source, file, _READ_CHUNK_BYTES)
        except Exception as error:
            raise _local_error(error, uri, field, "write") from error

    def download_file(self, uri: str, path, *, field: str | None = None) -> int:
        """Download to `path` (S3: the transfer manager, parallel ranged GETs when large)
        through a temporary file renamed into place, so an interrupted download never leaves a
        partial file there. Returns the bytes written."""
        path = Path(path)
        if not is_s3_uri(uri):
            source = local_path(uri)
            try:
                with _atomic_local_file(path) as file, open(source, "rb") as reader:
                    shutil.copyfileobj(reader, file, _READ_CHUNK_BYTES)
            except Exception as error:
                raise _local_error(error, uri, field, "read") from error
            return path.stat().st_size
        bucket, key = split_s3_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # s3transfer writes to a temporary name beside `path` and renames it on success.
            self.client.download_file(bucket, key, str(path), Config=self._transfer_config())
        except Exception as error:
            raise _translate(error, uri, field, "download") from error
        written = path.stat().st_size
        self.stats.add(gets=1, bytes_downloaded=written)
        return written

    def exists(self, uri: str, *, field: str | None = None) -> bool:
        if not is_s3_uri(uri):
            return local_path(uri).exists()
        bucket, key = split_s3_uri(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as error:
            translated = _translate(error, uri, field, "look up")
            if not isinstance(translated, ObjectNotFound):
                raise translated from error
        # HEAD answers a bare 404 for a missing bucket too; tell the two apart.
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as error:
            translated = _translate(error, uri, field, "look up")
            if isinstance(translated, ObjectNotFound):
                raise TrainerError(ExitCode.ACCESS_DENIED, f"bucket {bucket!r} does not exist "
                                   f"(while trying to look up {uri})", field) from error
            raise translated from error
        return False

    def delete(self, uri: str, *, field: str | None = None) -> None:
        """Delete one object; deleting one that is not there is not an error."""
        if is_s3_uri(uri):
            bucket, key = split_s3_uri(uri)
            try:
                self.client.delete_object(Bucket=bucket, Key=key)
            except Exception as error:
                raise _translate(error, uri, field, "delete") from error
            return
        try:
            local_path(uri).unlink(missing_ok=True)
        except Exception as error:
            raise _local_error(error, uri, field, "delete") from error


def open_store(s3: dict | None = None, **options: Any) -> ObjectStore:
    """The store for a FineTuneJob: `s3` is spec.dataset.s3 (endpoint, region, addressingStyle;
    credentials come from the standard AWS chain, where the operator maps the Secret)."""
    return ObjectStore(s3, **options)


def _stat_etag(stat: os.stat_result) -> str:
    return f"{stat.st_size:x}-{stat.st_mtime_ns:x}"


def _local_error(error: Exception, uri: str, field: str | None, operation: str) -> TrainerError:
    if isinstance(error, TrainerError):
        return error
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return ObjectNotFound(ExitCode.INVALID_DATA, f"{uri} does not exist", field)
    if isinstance(error, PermissionError):
        return TrainerError(ExitCode.ACCESS_DENIED, f"permission denied to {operation} {uri}",
                            field)
    return TrainerError(ExitCode.FAILED, f"could not {operation} {uri}: {error}", field)


class _atomic_local_file:
    """Write to a temporary file next to `path` and rename it over `path` on success. With
    replace=False an existing `path` is kept and FileExistsError raised (a hard link, unlike a
    rename, refuses to replace)."""

    def __init__(self, path: Path, *, replace: bool = True):
        self.path = Path(path)
        self.replace = replace

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, self.tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.path.parent)
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide outputs from other users
        self.file = os.fdopen(descriptor, "wb")
        return self.file

    def __exit__(self, exc_type, exc, traceback):
        self.file.close()
        if exc_type is None and self.replace:
            os.replace(self.tmp_name, self.path)
            return False
        try:
            if exc_type is None:
                os.link(self.tmp_name, self.path)
        finally:
            os.unlink(self.tmp_name)
        return False


def upload_directory(local_dir: Path, uri: str, store: ObjectStore, max_workers: int = 16, *,
                     on_upload=None) -> int:
    """Upload every file under `local_dir` to `uri` keeping relative paths, skipping files whose
    object already has the same size and content (ETag = MD5, multipart-aware). Returns the
    number of objects uploaded. `on_upload(key)` is called after each upload."""
    from concurrent.futures import ThreadPoolExecutor

    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise TrainerError(ExitCode.INVALID_DATA, f"{local_dir} is not a directory")
    files = sorted(path for path in local_dir.rglob("*")
                   if path.is_file() and not path.name.startswith(".tmp-"))
    existing = {info.key: info for info in store.list(uri)}

    def unchanged(path: Path, key: str) -> bool:
        info = existing.get(key)
        if info is None or info.size != path.stat().st_size:
            return False
        if is_s3_uri(uri):
            return info.etag == local_etag(path, store.multipart_chunk_bytes)
        return local_etag(path) == local_etag(local_path(info.uri))

    def upload(path: Path) -> int:
        key = path.relative_to(local_dir).as_posix()
        if unchanged(path, key):
            return 0
        store.upload_file(path, join_uri(uri, key))
        if on_upload:
            on_upload(key)
        return 1

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return sum(pool.map(upload, files))
