"""Where the images are: a local folder, or a prefix in object storage (``s3://bucket/prefix``).

An ``ImageSource`` lists the images under its root with a content key per image (what says a
file is unchanged since it was labelled: ``[size, mtime_ns]``) and reads an image's bytes.
File names are POSIX paths relative to the root, in a local folder as under a prefix, so the
COCO ``file_name`` is the same wherever the images live.

Object storage goes through pyarrow's filesystems (``pyarrow.fs.FileSystem.from_uri``):
``s3://`` (credentials, region and ``AWS_ENDPOINT_URL`` from the usual AWS environment),
``gs://``, ``abfs://`` and ``hdfs://`` where pyarrow was built with them. pyarrow comes with
the ``ray`` extra; a local folder needs nothing more.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

from ..errors import SelfmentError
from .images import (
    ImageReader,
    ImageSkip,
    find_images,
    is_image_name,
    read_image_file,
    report_unsupported,
)

if TYPE_CHECKING:
    import pyarrow.fs

logger = logging.getLogger(__name__)

URI_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")
ContentKey = list[int] | None
ENDPOINT_SECONDS = 10.0
"""How long an object storage endpoint named by the user may take to answer a first request."""
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(SelfmentError, RuntimeError):
    """Object storage that cannot be listed, or a URI no filesystem understands."""


def is_uri(images: str | Path) -> bool:
    """Whether ``images`` names object storage (``scheme://...``) rather than a local path."""
    return isinstance(images, str) and bool(URI_PATTERN.match(images))


class ImageSource(Protocol):
    """The images of a run: listed once by the driver, read by whoever decodes them."""

    @property
    def uri(self) -> str:
        """The root as recorded in run.json (an absolute folder, or the URI)."""
        ...

    @property
    def location(self) -> Path | ImageReader:
        """What ``prepare_image`` decodes from: the local folder, or this source."""
        ...

    def list_images(self) -> dict[str, ContentKey]:
        """Every image's file name (sorted) -> its content key (None when it cannot be had)."""
        ...

    def read(self, file_name: str) -> bytes:
        """The bytes of one image; raises ``ImageSkip`` with the reason when unreadable."""
        ...


def content_key(path: Path) -> ContentKey:
    """What says a local image file is unchanged: ``[size, mtime_ns]`` (None when it is gone)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


@dataclass
class LocalFolder:
    """Images in a local folder, searched recursively.

    Arguments:
      root: the folder.
      skip_folder: called with each sub-folder; True leaves it out (run folders).
    """

    root: Path
    skip_folder: Callable[[Path], bool] | None = None

    @property
    def uri(self) -> str:
        """The folder, absolute."""
        return str(self.root.resolve())

    @property
    def location(self) -> Path:
        """The folder (decoded lazily from the file, so a bomb is refused before reading it)."""
        return self.root

    def list_images(self) -> dict[str, ContentKey]:
        """Images under the folder (run folders left out, with one warning) and their keys."""
        names = find_images(self.root, skip_folder=self.skip_folder, report=True)
        return {name: content_key(self.root / name) for name in names}

    def read(self, file_name: str) -> bytes:
        """The file's bytes (not a regular file, empty or unreadable: ``ImageSkip``)."""
        return read_image_file(self.root / file_name)


class ObjectStoreFolder:
    """Images under a prefix of object storage, through a pyarrow filesystem.

    Arguments:
      uri: ``scheme://bucket/prefix`` (``s3://``, ``gs://``, ...).

    Raises:
      StorageError: pyarrow is missing or does not know the scheme.
    """

    def __init__(self, uri: str):
        self._uri = uri.rstrip("/")
        fs_module = _pyarrow_fs()
        try:
            self.filesystem, self.prefix = fs_module.FileSystem.from_uri(self._uri)
        except (ValueError, OSError, ImportError) as error:
            raise StorageError(f"cannot open {uri}: {error}") from None
        self.prefix = self.prefix.rstrip("/")

    @property
    def uri(self) -> str:
        """The URI, without a trailing slash."""
        return self._uri

    @property
    def location(self) -> ObjectStoreFolder:
        """This source: images are decoded from the bytes it reads."""
        return self

    def list_images(self) -> dict[str, ContentKey]:
        """Images under the prefix (hidden names left out) and their ``[size, mtime_ns]``.

        Raises:
          StorageError: the prefix cannot be listed (no such bucket, no access, no network, an
            endpoint that does not answer within ``ENDPOINT_SECONDS``).
        """
        fs_module = _pyarrow_fs()
        endpoint = s3_endpoint(self._uri)
        if endpoint:
            check_endpoint(endpoint)
        selector = fs_module.FileSelector(self.prefix, recursive=True, allow_not_found=True)
        bucket = self.prefix.split("/", 1)[0]
        try:
            if self.filesystem.get_file_info(bucket).type == fs_module.FileType.NotFound:
                raise StorageError(
                    f"cannot list {self._uri}: the bucket {bucket!r} does not exist "
                    "(or these credentials cannot see it)"
                )
            infos = self.filesystem.get_file_info(selector)
        except OSError as error:
            raise StorageError(f"cannot list {self._uri}: {error}") from None
        found: dict[str, ContentKey] = {}
        unsupported: Counter[str] = Counter()
        for info in infos:
            if info.type != fs_module.FileType.File:
                continue
            name = info.path[len(self.prefix) :].lstrip("/")
            if any(part.startswith(".") for part in name.split("/")):
                continue
            if is_image_name(name, unsupported):
                mtime = info.mtime_ns
                found[name] = [int(info.size), int(mtime)] if mtime is not None else None
        report_unsupported(unsupported)
        return dict(sorted(found.items()))

    def read(self, file_name: str) -> bytes:
        """The object's bytes (missing or unreadable: ``ImageSkip``)."""
        try:
            with self.filesystem.open_input_stream(f"{self.prefix}/{file_name}") as stream:
                return stream.read()
        except PermissionError:
            raise ImageSkip("permission denied") from None
        except OSError as error:
            raise ImageSkip(f"cannot read: {error}") from None


def s3_endpoint(uri: str) -> str | None:
    """The endpoint an ``s3://`` URI is served from when the user names one (the URI's
    ``endpoint_override``, else ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL``), as
    ``scheme://host[:port]``; None for AWS itself and for other schemes."""
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        return None
    query = parse_qs(parts.query)
    if "endpoint_override" in query:
        endpoint = query["endpoint_override"][0]
        scheme = query.get("scheme", ["https"])[0]
        return endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    return next((os.environ[name] for name in ENDPOINT_ENV if os.environ.get(name)), None)


def _liveness_tls() -> ssl.SSLContext:
    """A TLS context for a liveness probe only: nothing secret is sent, so the certificate is
    left to pyarrow's own requests to verify."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_endpoint(endpoint: str, timeout: float | None = None) -> None:
    """Fail in one sentence, within ``timeout`` seconds (``ENDPOINT_SECONDS``), when an object
    storage endpoint does not answer a plain HTTP request (pyarrow would retry for minutes).

    Raises:
      StorageError: nothing accepts a connection there, or what does never answers.
    """
    timeout = ENDPOINT_SECONDS if timeout is None else timeout
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    request = f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = _liveness_tls().wrap_socket(raw, server_hostname=host) if secure else raw
            sock.sendall(request)
            answer = sock.recv(1)
    except TimeoutError:
        answer = None
    except OSError as error:
        raise StorageError(
            f"cannot reach the object storage endpoint {endpoint}: {error}"
        ) from None
    if not answer:
        what = f"did not answer within {timeout:g} s" if answer is None else "closed it unanswered"
        raise StorageError(
            f"the object storage endpoint {endpoint} accepts connections but {what}; check the "
            "endpoint (AWS_ENDPOINT_URL or the URI's endpoint_override)"
        )


def _pyarrow_fs() -> pyarrow.fs:
    try:
        import pyarrow.fs
    except ImportError:
        raise StorageError(
            'object storage input needs pyarrow: pip install -e ".[ray]" (or pip install pyarrow)'
        ) from None
    return pyarrow.fs


def open_source(
    images: str | Path, skip_folder: Callable[[Path], bool] | None = None
) -> ImageSource:
    """The image source ``images`` names: a URI (object storage) or a local folder.

    Arguments:
      images: ``scheme://bucket/prefix`` or a folder path.
      skip_folder: for a local folder, which sub-folders to leave out.

    Raises:
      StorageError: a URI no filesystem understands, or pyarrow missing.
    """
    if is_uri(images):
        return ObjectStoreFolder(str(images))
    return LocalFolder(Path(images), skip_folder)
