"""Storage: every read and write of user data, on local disk or in an object store.

A `Location` is a filesystem (`pyarrow.fs`) and a path on it, made from what a user writes:
`s3://bucket/key`, `gs://bucket/key`, `abfs://container@account/key`, or a local path. This
module is the only one that tells a URI from a path; the others pass Locations around and
call their methods, so a job reads and writes a bucket the way it reads and writes a folder.

- S3: credentials and endpoint come from the standard AWS variables and files
  (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ..., `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for any
  S3-compatible store). Transient errors are retried with backoff by the AWS SDK's standard
  strategy. Other schemes go through `pyarrow.fs.FileSystem.from_uri`, then fsspec.
- Writes are whole objects: one PUT on an object store (atomic there, no rename, no multipart
  upload for small objects); a temp file and a rename on local disk. Nothing half-written is
  ever visible under its final name.
- Errors are `StorageError`s whose message names the URI and says why in words (no such
  bucket, access denied, no such file), for error lines and failed rows alike.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pixfleet.errors import UserError

S3_RETRY_ATTEMPTS = 6  # the SDK's exponential backoff: about 20 s of trying in all
CACHE = Path.home() / ".cache" / "pixfleet" / "storage"


class StorageError(UserError, OSError):
    """A read or write that failed; the message names the URI and the reason."""


@dataclass(frozen=True)
class Location:
    """A file or folder on a filesystem: local (`scheme` "") or in an object store."""

    fs: pafs.FileSystem
    path: str  # the filesystem's own path: "bucket/key" in a store, absolute on local disk
    scheme: str = ""

    @classmethod
    def of(cls, value: str | os.PathLike) -> Location:
        """The Location a user's string names; a relative local path is made absolute here, on the
        driver, so tasks on other processes see the same file."""
        text = os.fspath(value)
        scheme, sep, rest = text.partition("://")
        if not sep or not scheme.isalnum():  # a Windows drive or a plain path
            return cls(_local_fs(), os.path.abspath(os.path.expanduser(text)))
        scheme = scheme.lower()
        if scheme in ("s3", "s3a"):
            if "@" in rest.split("/", 1)[0]:
                raise StorageError(f"{redact(text)}: put credentials in the environment, not in the URI")
            return cls(_s3(), rest.rstrip("/"), "s3")
        fs, path = _from_uri(scheme, text)
        return cls(fs, path.rstrip("/"), scheme)

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, part: str) -> Location:
        joined = posixpath.join(self.path, part) if self.scheme else os.path.join(self.path, part)
        return Location(self.fs, joined, self.scheme)

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path), self.scheme)

    def relative_to(self, root: Location) -> str:
        return posixpath.relpath(self.path, root.path)

    def resolve(self, reference: str) -> Location:
        """`reference` as a table cell means it: a URI or absolute path as it is, a relative path
        against this folder."""
        if "://" in reference or os.path.isabs(reference):
            return Location.of(reference)
        return self / reference

    # Questions

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as error:
            raise StorageError(f"{self.uri}: {reason(error)}") from None

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def files(self, suffixes: tuple[str, ...] = (), recursive: bool = True) -> list[Location]:
        """Files under this folder (those ending in one of `suffixes`, if given; hidden ones
        left out), sorted by path; none when the folder does not exist."""
        return [location for location, _ in self.file_infos(suffixes, recursive)]

    def file_infos(
        self, suffixes: tuple[str, ...] = (), recursive: bool = True
    ) -> list[tuple[Location, pafs.FileInfo]]:
        """`files` with each one's size and modification time, from the same listing. On local
        disk an entry that cannot be looked at (a link to nowhere, or to itself) is listed too,
        so that reading it fails with the reason rather than it going missing unnoticed."""
        try:
            if self.is_local:
                infos = list(_local_file_infos(self.path, recursive))
            else:
                selector = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
                infos = [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        except OSError as error:
            raise StorageError(f"{self.uri}: {reason(error)}") from None
        wanted = tuple(s.lower() for s in suffixes)
        found = []
        for info in infos:
            hidden = any(part.startswith(".") for part in posixpath.relpath(info.path, self.path).split("/"))
            if not hidden and (not wanted or info.path.lower().endswith(wanted)):
                found.append((Location(self.fs, info.path, self.scheme), info))
        return sorted(found, key=lambda pair: pair[0].path)

    def subfolders(self) -> list[Location]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as error:
            raise StorageError(f"{self.uri}: {reason(error)}") from None
        folders = [info.path for info in infos if info.type == pafs.FileType.Directory]
        return [Location(self.fs, path, self.scheme) for path in sorted(folders)]

    # Reads

    def read_bytes(self) -> bytes:
        if self.is_local:  # plain file I/O: the OS's own words for what went wrong
            try:
                return Path(self.path).read_bytes()
            except IsADirectoryError:
                raise StorageError(f"{self.uri} is a folder, not a file") from None
            except FileNotFoundError:
                raise StorageError(f"{self.uri}: no such file") from None
            except OSError as error:
                raise StorageError(f"{self.uri}: cannot read ({error.strerror or type(error).__name__})") from None
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()
        except OSError as error:
            raise StorageError(f"{self.uri}: {reason(error)}") from None

    def read_range(self, start: int, length: int) -> bytes:
        """`length` bytes from byte `start` (fewer at the end of the file)."""
        try:
            with self.fs.open_input_file(self.path) as f:
                return f.read_at(length, start)
        except OSError as error:
            raise StorageError(f"{self.uri}: {reason(error)}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input_file(self):
        """A random-access file (parquet footers, row groups)."""
        try:
            return self.fs.open_input_file(self.path)
        except OSError as error:
            raise StorageError(f"{self.uri}: {reason(error)}") from None

    # Writes

    def write_bytes(self, data: bytes) -> None:
        """The whole object at once: one PUT, or temp file + rename on local disk."""
        if self.is_local:
            _atomic_local_write(Path(self.path), data)
            return
        try:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)
        except OSError as error:
            raise StorageError(f"{self.uri}: cannot write ({reason(error)})") from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def put_file(self, source: Path) -> None:
        """A finished local file as this object (large ones too, streamed): a rename next to the
        target on local disk; an upload that completes only once the whole file is sent."""
        if self.is_local:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                shutil.copyfile(source, staging)
                os.replace(staging, target)
            finally:
                staging.unlink(missing_ok=True)
            return
        try:
            pafs.copy_files(str(source), self.path, source_filesystem=_local_fs(), destination_filesystem=self.fs)
        except OSError as error:
            raise StorageError(f"{self.uri}: cannot write ({reason(error)})") from None
        if self.info().size != source.stat().st_size:
            raise StorageError(f"{self.uri}: the upload was cut short; run again")

    def delete(self) -> None:
        """Remove the file; a missing one is fine."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            if "NotFound" not in str(error) and "NO_SUCH_KEY" not in str(error):
                raise StorageError(f"{self.uri}: cannot delete ({reason(error)})") from None

    def make_folder(self) -> None:
        """A local folder (and its parents); object stores have no folders to make."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)

    # Whole folders

    def cached_copy(self) -> Path:
        """A local copy of this folder (a model's, say) or file (LoRA weights), downloaded once
        per node under ~/.cache/pixfleet/storage and keyed by the URI and the files' sizes and
        modification times: a changed model is fetched again."""
        if self.is_local:
            return Path(self.path)
        single = self.info()
        files = [(self, single)] if single.type == pafs.FileType.File else self.file_infos()
        if not files:
            raise StorageError(f"{self.uri}: no such file or folder, or an empty one")
        names = [self.name] if single.type == pafs.FileType.File else [f.relative_to(self) for f, _ in files]
        stamp = "|".join(f"{name}:{info.size}:{info.mtime_ns}" for name, (_, info) in zip(names, files, strict=True))
        folder = CACHE / f"{self.name}-{hashlib.sha256(f'{self.uri}|{stamp}'.encode()).hexdigest()[:16]}"
        if not folder.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{folder.name}."))
            try:
                for name, (file, _) in zip(names, files, strict=True):
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(file.read_bytes())
                try:  # processes of one node may download at once: the first rename wins
                    staging.rename(folder)
                except OSError:
                    if not folder.exists():
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return folder / self.name if single.type == pafs.FileType.File else folder

    def upload_folder(self, source: Path) -> None:
        """Copy a local folder's files under this Location (a trained model, say)."""
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            (self / path.relative_to(source).as_posix()).write_bytes(path.read_bytes())


def is_uri(value: str) -> bool:
    """True for `scheme://...` (an object store, or any filesystem pyarrow or fsspec knows)."""
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.isalnum()


def redact(text: str) -> str:
    """A URI without any `user:secret@` part, for messages and logs."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def reason(error: OSError) -> str:
    """The words for a filesystem error: what a user can act on, not the SDK's request ids."""
    text = str(error)
    known = {
        "NO_SUCH_BUCKET": "no such bucket",
        "ACCESS_DENIED": "access denied (check the credentials and the bucket's permissions)",
        "NO_SUCH_KEY": "no such file",
        "INVALID_ACCESS_KEY_ID": "the access key is not known to the store",
        "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key",
        "NETWORK_CONNECTION": "cannot reach the store (check AWS_ENDPOINT_URL and the network)",
        "Missing bucket name": "no bucket in the URI",
    }
    for marker, words in known.items():
        if marker in text:
            return words
    if status := re.search(r"AWS Error \w+ \(HTTP status (\d+)\)", text):
        return f"the store answered HTTP {status.group(1)}"
    if isinstance(error, FileNotFoundError) or "Path does not exist" in text:
        return "no such file or folder"
    if isinstance(error, IsADirectoryError) or "is a directory" in text:
        return "a folder, not a file"
    return text.split(". Detail:")[0].split(" (Request ID")[0]


def check_readable(value: str, field: str) -> Location:
    """The Location of `value` once it is known to exist and be readable; a ConfigError naming
    `field` and the URI otherwise (exit 2, before any work)."""
    from pixfleet.config import ConfigError

    try:
        location = Location.of(value)
        if not location.exists():
            raise StorageError(f"{location.uri}: {_missing(location)}")
    except StorageError as error:
        raise ConfigError(f"{field}: {error}") from None
    return location


def check_writable(value: str, field: str) -> Location:
    """The Location of `value` once a probe object could be written and removed under it."""
    from pixfleet.config import ConfigError

    try:
        location = Location.of(value)
        location.make_folder()
        probe = location / f".pixfleet-write-check-{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.delete()
    except (StorageError, OSError) as error:
        message = str(error) if isinstance(error, StorageError) else f"{value}: cannot write ({error.strerror})"
        raise ConfigError(f"{field}: {message}") from None
    return location


def _missing(location: Location) -> str:
    """Why a Location is not there: its bucket, or the key."""
    if location.scheme:
        bucket = Location(location.fs, location.path.split("/", 1)[0], location.scheme)
        if bucket.path != location.path and not bucket.exists():
            return "no such bucket"
    return "no such file or folder"


def _local_file_infos(root: str, recursive: bool) -> Iterator[pafs.FileInfo]:
    folders = [root]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    if recursive:
                        folders.append(entry.path)
                    continue
                stat = entry.stat()
            except OSError:  # listed, so that reading it says why it cannot be read
                yield pafs.FileInfo(entry.path, pafs.FileType.Unknown)
            else:
                yield pafs.FileInfo(entry.path, pafs.FileType.File, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@functools.cache
def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@functools.cache
def _s3() -> pafs.S3FileSystem:
    """One S3 filesystem per process: it is not bucket-specific."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        allow_delayed_open=True,  # a small object is one PutObject, not a multipart upload
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
    )


def _from_uri(scheme: str, text: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for the URI (gs://, abfs://, hdfs://, file://), else fsspec's."""
    try:
        return pafs.FileSystem.from_uri(text)
    except (ValueError, OSError):
        pass
    try:
        import fsspec

        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as error:
        raise StorageError(f"{redact(text)}: no filesystem for {scheme}:// ({error})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(text)
