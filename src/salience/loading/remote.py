"""Images in object storage: ``s3://bucket/prefix/...`` (and the other URIs of ``pyarrow.fs``)
listed and read for dataset runs.

Through ``pyarrow.fs`` (pyarrow is already what dataset runs write their tables with, so no new
dependency): its ``S3FileSystem`` is a C++ client with its own retries and no event loop, picklable
for DataLoader workers and Ray tasks. An S3-compatible server (MinIO, Ceph, a local test server) is
named by the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables; the credentials and
region come from the AWS SDK's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, an instance role; ``AWS_REGION`` / ``AWS_DEFAULT_REGION``). ``gs://`` is pyarrow's
``GcsFileSystem`` (Google's default credentials; ``STORAGE_EMULATOR_HOST`` names an emulator).
Other schemes (``abfs://``, ``hdfs://``) go through ``pyarrow.fs.FileSystem.from_uri`` as they are.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

from salience._core.errors import SalienceError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CACHE: dict[tuple[str, str, int], Any] = {}


def is_remote(text: Any) -> bool:
    """Whether ``text`` is an object storage URL (``s3://...``; ``file://`` is a local path)."""
    m = _SCHEME.match(str(text)) if isinstance(text, str) else None
    return bool(m) and m.group(1).lower() != "file"


def _hint(url: str) -> str:
    if url.lower().startswith(("s3://", "s3a://")):
        return ("check the bucket and prefix, the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                "AWS_PROFILE), the region (AWS_REGION) and, for an S3-compatible server, AWS_ENDPOINT_URL")
    if url.lower().startswith(("gs://", "gcs://")):
        return ("check the bucket and prefix, the credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud's) and, "
                "for a storage emulator, STORAGE_EMULATOR_HOST")
    if url.lower().startswith(("abfs://", "abfss://")):
        return ("check the account and container (abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH) and the "
                "credentials (Azure's default chain: AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET, a "
                "managed identity, az login)")
    if url.lower().startswith(("hdfs://", "viewfs://")):
        return ("HDFS needs Java and Hadoop's libhdfs on this machine (JAVA_HOME, HADOOP_HOME, CLASSPATH from "
                "`hadoop classpath --glob`; ARROW_LIBHDFS_DIR if libhdfs.so is elsewhere) and the namenode in the "
                "URL (hdfs://HOST:PORT/PATH)")
    return "check the URL and the credentials of its storage"


class NoSuchObject(SalienceError):
    """The URL names no object (never stored, or deleted / moved since it was listed)."""


class StorageError(SalienceError):
    """The storage did not answer as asked: unreachable endpoint, refused credentials, no bucket."""


def error(url: str, what: str, e: BaseException) -> StorageError:
    """A :class:`StorageError` for a failed ``what`` on ``url``, with what to check; one line (pyarrow's
    HDFS client without Java lists every path it tried, a line each)."""
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" (Request ID")[0].strip()
    return StorageError(f"{url}: cannot {what} ({detail}); {_hint(url)}")


def _s3(bucket: str) -> Any:
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not endpoint:
        if region:
            return pafs.S3FileSystem(region=region)
        return pafs.FileSystem.from_uri(f"s3://{bucket}")[0]  # asks AWS for the bucket's region
    scheme, _, host = endpoint.partition("://") if "://" in endpoint else ("https", "", endpoint)
    return pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=scheme, region=region or "us-east-1",
                             connect_timeout=10, request_timeout=60)


def _gcs(url: str) -> Any:
    """Google Cloud Storage; ``STORAGE_EMULATOR_HOST`` (the variable of Google's own client
    libraries and tools) names an emulator, reached without credentials, retrying for 15 s."""
    import datetime

    import pyarrow.fs as pafs

    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return pafs.FileSystem.from_uri(url)[0]
    scheme, _, address = host.partition("://") if "://" in host else ("http", "", host)
    return pafs.GcsFileSystem(anonymous=True, scheme=scheme, endpoint_override=address.rstrip("/"),
                              retry_time_limit=datetime.timedelta(seconds=15))


def filesystem(url: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path in it)`` of ``url``; one filesystem per scheme and bucket per
    process (DataLoader workers and Ray tasks make their own on first use)."""
    scheme = _SCHEME.match(url).group(1).lower()  # type: ignore[union-attr]
    rest = url[len(scheme) + 3:]
    bucket = rest.split("/", 1)[0]
    key = (scheme, bucket, os.getpid())
    try:
        if scheme in ("s3", "s3a", "gs", "gcs"):
            if key not in _CACHE:
                _CACHE[key] = _s3(bucket) if scheme in ("s3", "s3a") else _gcs(url)
            return _CACHE[key], rest
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)  # the path in it depends on the scheme (abfs, hdfs ...)
        return _CACHE.setdefault(key, fs), path
    except ImportError:  # pragma: no cover - pyarrow is a dependency of the runs
        raise SalienceError("object storage paths need pyarrow: pip install 'salience[runs]'") from None
    except (OSError, ValueError) as e:
        raise error(url, "open its storage", e) from None


def _url(url: str, base: str, path: str) -> str:
    """The URL of ``path``, listed under ``base`` (the path of ``url`` in its filesystem): ``url``
    with the rest of ``path`` appended, so that the URL keeps what names the storage. For s3 and gs
    the path starts with the bucket, but for ``abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/...``
    it is ``CONTAINER/...`` and for ``hdfs://HOST:PORT/...`` ``/...``: rebuilt from the scheme alone
    it would name no account or host. A query (``?...``, options of ``from_uri``) stays at the end."""
    head, sep, query = url.partition("?")
    b, p = base.strip("/"), path.lstrip("/")
    if not b:
        return f"{head.rstrip('/')}/{p}{sep}{query}"
    if p.startswith(b + "/"):
        return f"{head.rstrip('/')}/{p[len(b) + 1:]}{sep}{query}"
    return f"{_SCHEME.match(url).group(1)}://{path}"  # type: ignore[union-attr]  # not under it: as pyarrow names it


def list_files(url: str, suffixes: Sequence[str]) -> list[str]:
    """The URLs of the files under ``url`` (a prefix, recursively) with one of ``suffixes``, sorted."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=False))
    except FileNotFoundError:
        raise SalienceError(f"{url}: no such prefix (nothing stored under it); check the path") from None
    except OSError as e:  # GCS says "no such file" as a plain OSError: ask whether anything is there
        if url.lower().startswith(("gs://", "gcs://")) and _missing(fs, path):
            raise SalienceError(f"{url}: no such prefix (nothing stored under it); check the path") from None
        raise error(url, "list it", e) from None
    return sorted(_url(url, path, i.path) for i in infos
                  if i.type == pafs.FileType.File and i.path.lower().endswith(tuple(suffixes)))


def _missing(fs: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    try:
        return fs.get_file_info(path.rstrip("/")).type == pafs.FileType.NotFound
    except OSError:
        return False


def kind(url: str) -> str:
    """``"file"``, ``"folder"`` (a prefix with objects under it) or ``"missing"``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    try:
        t = fs.get_file_info(path.rstrip("/")).type
    except OSError as e:
        raise error(url, "look it up", e) from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}.get(t, "missing")


def glob(pattern: str) -> list[str]:
    """The URLs matching ``pattern`` (``*`` and ``?`` within a path part, ``**`` across parts),
    listed from the pattern's fixed prefix, sorted."""
    scheme_len = _SCHEME.match(pattern).end()  # type: ignore[union-attr]
    parts = pattern[scheme_len:].split("/")
    fixed = next(i for i, p in enumerate(parts) if re.search(r"[*?\[]", p))
    base = pattern[:scheme_len] + "/".join(parts[:fixed])
    regex = re.compile(_translate(pattern))
    return [u for u in list_files(base, ("",)) if regex.fullmatch(u)]


def _translate(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        end = pattern.find("]", i + 2) if c == "[" else -1
        if end > 0:  # a class: [abc], [0-9], [!x]
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body.replace("\\", "\\\\")) + "]")
            i = end + 1
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return "".join(out)


def read_bytes(url: str, max_bytes: Optional[int] = None) -> bytes:
    """The whole object at ``url``; :class:`NoSuchObject` when there is none, :class:`StorageError`
    when the storage cannot be read, a :class:`SalienceError` when it is over ``max_bytes``
    (``None``: no limit; read up to one byte past it, never the whole of a larger object)."""
    fs, path = filesystem(url)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except FileNotFoundError:
        raise NoSuchObject(f"{url}: no such object; check the path (was it deleted or moved?)") from None
    except OSError as e:
        raise error(url, "read it", e) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise SalienceError(f"{url}: the object is over {max_bytes / 2**20:g} MB, more than any image within "
                            "the pixel limit; raise the limit (--max-pixels / max_pixels=) if it is an image")
    return data


def join(folder_url: str, relative: str) -> str:
    """``relative`` (a line of a list file) from the list's folder ``folder_url``."""
    return folder_url.rstrip("/") + "/" + (relative[2:] if relative.startswith("./") else relative)
