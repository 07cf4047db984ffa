"""Where datasets and models live: a local folder or an S3 prefix, one interface.

S3 goes through pyarrow's S3 filesystem with the standard AWS configuration: the
credentials chain (environment, ~/.aws, instance profile) and ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) for S3-compatible endpoints. Credentials are never
passed around or logged: workers build their own filesystem from the URI.

Every write is atomic: a reader sees a whole file or none. Locally that is a write
to a hidden temporary name and a rename; on S3 an object appears only when its
upload completes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from factory.core.errors import FactoryError


class StorageError(FactoryError, RuntimeError):
    """An output or model location that cannot be used; the message is one line."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.lru_cache(maxsize=None)
def s3_filesystem(attempts: int = 8) -> pafs.S3FileSystem:
    """Throttling, resets, refused connections and 5xx are retried by the SDK, ``attempts``
    in all, with exponential backoff and jitter (1 s, 2 s, 4 s, ... capped at 20 s): the
    default 8 ride out about 30-45 s of an endpoint restarting or throttling.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    scheme = None
    if endpoint:
        parsed = urlparse(endpoint)
        scheme, endpoint = parsed.scheme or "https", parsed.netloc or parsed.path
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.S3FileSystem(
        endpoint_override=endpoint, scheme=scheme, region=region,
        connect_timeout=5, request_timeout=60,
        # Objects smaller than a part go up in one PutObject, which a retry repeats safely,
        # instead of a three-request multipart upload.
        allow_delayed_open=True,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


@dataclass(frozen=True)
class Location:
    """A folder: ``uri`` as the user wrote it, ``root`` the path inside ``fs``."""
    uri: str
    fs: pafs.FileSystem
    root: str

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def url(self, relative: str) -> str:
        return f"{self.uri.rstrip('/')}/{relative}"

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Atomic: readers never see a partial file under ``relative``."""
        target = self.path(relative)
        if isinstance(self.fs, pafs.LocalFileSystem):
            directory, name = target.rsplit("/", 1)
            os.makedirs(directory, exist_ok=True)
            temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        else:
            with self.fs.open_output_stream(target) as stream:
                stream.write(data)

    def list(self, relative: str, suffix: str = "") -> list[str]:
        """Relative paths of the files directly in a subfolder (hidden temporaries skipped)."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        names = []
        for info in self.fs.get_file_info(selector):
            name = info.base_name
            if info.type == pafs.FileType.File and name.endswith(suffix) and not name.startswith("."):
                names.append(f"{relative}/{name}")
        return sorted(names)

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))

    def remove_temporaries(self, relative: str) -> int:
        """Delete the hidden temporaries of writers killed mid-write (local folders only)."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        stale = [info.path for info in self.fs.get_file_info(selector)
                 if info.base_name.startswith(".") and info.base_name.endswith(".tmp")]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)


def open_location(uri: str, attempts: int = 8) -> Location:
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
        return Location(uri.rstrip("/"), s3_filesystem(attempts),
                        f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/"))
    if "://" in uri:
        raise StorageError(f"unsupported URI {uri!r}: use a local path or s3://bucket/prefix")
    return Location(uri, pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve()))


def check_reachable(uri: str) -> Location:
    """Fail fast (one line) on an output that cannot exist: before any model loads.

    The bucket must exist and answer now (one quick attempt) to these credentials;
    whether we may write is proven by the build's first write, after every other check
    has passed.
    """
    location = open_location(uri)
    if not is_s3(uri):
        parent = Path(location.root)
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise StorageError(f"output {uri} is not writable ({parent} is not a writable folder)")
        return location
    bucket = location.root.split("/", 1)[0]
    fs = open_location(uri, attempts=2).fs
    try:
        # A refused HeadBucket has no body; a refused listing says why (unknown key,
        # wrong secret, no permission).
        fs.get_file_info(pafs.FileSelector(location.root, allow_not_found=True))
        info = fs.get_file_info(bucket)
    except OSError as exc:
        if access_refused(exc):
            raise StorageError(f"no access to bucket {bucket!r} with these credentials: {first_line(exc)}") from None
        raise StorageError(f"cannot reach bucket {bucket!r}: {first_line(exc)}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket {bucket!r} does not exist")
    return location


def absolute_uri(uri: str | None) -> str | None:
    """Local paths made absolute: Ray workers run in their own working directory."""
    return uri if uri is None or is_s3(uri) else str(Path(uri).expanduser().resolve())


def split_file_uri(uri: str) -> tuple[str, str]:
    """(folder, file name) of a file's URI, local or s3://."""
    folder, _, name = uri.rpartition("/")
    if not name or folder in ("s3:", "s3:/"):
        raise StorageError(f"{uri!r} must name a file, e.g. results.json or s3://bucket/evals/results.json")
    return folder or ".", name


def write_file(uri: str, data: bytes) -> None:
    """One file by its own URI, local or s3://, atomically (Location.write_bytes)."""
    folder, name = split_file_uri(uri)
    open_location(folder).write_bytes(name, data)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# How the AWS SDK names refusals that no retry fixes (pyarrow passes its error names on).
_REFUSALS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied")


def access_refused(exc: BaseException) -> bool:
    """The store refused these credentials or this action (permanent, unlike a 5xx or a reset)."""
    return any(name in str(exc) for name in _REFUSALS)


def check_model_source(source: str, required_file: str | None = None) -> None:
    """A model named by path or s3:// must exist (a model id is left to the hub client)."""
    looks_like_path = is_s3(source) or source.startswith((".", "/", "~")) or os.path.exists(source)
    if not looks_like_path:
        return
    location = open_location(source)
    try:
        target = required_file or ""
        if not location.exists(target):
            what = f"{source}/{required_file}" if required_file else source
            raise StorageError(f"model not found: {what}")
    except OSError as exc:
        raise StorageError(f"cannot read model {source}: {first_line(exc)}") from None


def absolute_model_source(source: str | None) -> str | None:
    """A model named by an existing local path, made absolute: Ray workers run in their own working
    directory. Model ids, s3:// prefixes and built-in names are returned as they are."""
    if source is None or is_s3(source) or not os.path.exists(os.path.expanduser(source)):
        return source
    return str(Path(source).expanduser().resolve())


def local_copy(source: str) -> str:
    """A local path for a model file or folder: s3:// ones are downloaded once into a cache."""
    if not is_s3(source):
        return os.path.expanduser(source)
    location = open_location(source)
    info = location.fs.get_file_info(location.root)
    cache = Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "dataset-factory"))
    target = cache / "models" / hashlib.sha256(source.encode()).hexdigest()[:16]
    local = target / info.base_name if info.type == pafs.FileType.File else target
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(location.root, str(local), source_filesystem=location.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        (target / ".complete").touch()
    return str(local)
