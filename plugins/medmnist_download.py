"""Download a MedMNIST file atomically: stream to a temporary file beside the target, check its MD5
against `medmnist.INFO`, then rename. An interrupted or failed download leaves nothing behind.

`MEDFORMER_MEDMNIST_MIRROR` (or the `mirror` argument) replaces Zenodo with another base URL that
holds the official file names, e.g. an institutional mirror or `file:///shared/medmnist`.
"""

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from medformer_core import DataError, atomic_write
from medformer_plugins.medmnist_files import Variant, file_md5

MIRROR_ENV = "MEDFORMER_MEDMNIST_MIRROR"
CHUNK = 2**20


def source_url(variant: Variant, mirror: str | None = None) -> str:
    mirror = mirror or os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{variant.file_name}" if mirror else variant.url


def download(variant: Variant, data_root: Path, *, force: bool = False, ignore_md5: bool = False,
             mirror: str | None = None, progress: Callable[[int, int | None], None] | None = None,
             opener: Callable | None = None) -> tuple[Path, bool]:
    """Fetch `variant` into `data_root`; returns (path, downloaded). A present file with the right
    MD5 is kept unless `force`. `ignore_md5` keeps a file whose MD5 differs (explicit override).
    `opener(url, timeout=...)` defaults to `urllib.request.urlopen`."""
    target = Path(data_root).expanduser() / variant.file_name
    if target.is_file() and not force and file_md5(target) == variant.md5:
        return target, False
    url = source_url(variant, mirror)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data root {target.parent}: {exc.strerror}",
                        hint="pass a writable --data-root") from None
    with atomic_write(target) as temp:
        with open(temp, "wb") as out:
            actual = _fetch(url, out, progress, opener or urllib.request.urlopen)
        if actual != variant.md5 and not ignore_md5:
            raise DataError(f"{url}: downloaded MD5 {actual} differs from {variant.md5} (medmnist.INFO); "
                            "nothing was saved",
                            hint="retry; pass --ignore-md5 to keep a file whose checksum differs")
    return target, True


def _fetch(url: str, out, progress, opener) -> str:
    """Stream `url` into the open file `out`; returns the MD5 of what was written."""
    digest = hashlib.md5()
    try:
        with opener(url, timeout=60) as response:
            length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
            total, done = (int(length) if length else None), 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, str) else getattr(exc.reason, "strerror", None) or exc.reason
        raise DataError(f"cannot download {url}: {reason}",
                        hint=f"check the network connection, or set {MIRROR_ENV} to a reachable copy") from None
    except (OSError, TimeoutError) as exc:
        raise DataError(f"download of {url} failed: {exc}", hint="retry; the partial file was removed") from None
    if total is not None and done != total:
        raise DataError(f"download of {url} stopped after {done} of {total} bytes", hint="retry")
    return digest.hexdigest()
