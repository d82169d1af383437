"""MedMNIST download: atomic (temp file then rename), MD5-checked, clean failures, nothing left behind."""

import hashlib
import io
import urllib.error

import pytest

from medformer_core.api.errors import DataError
from medformer_plugins.medmnist_download import download, source_url
from medformer_plugins.medmnist_files import Variant

PAYLOAD = b"not really an npz, but bytes with a known checksum" * 1000
VARIANT = Variant("breastmnist", 64)


class Response(io.BytesIO):
    def __init__(self, data: bytes, length: int | None = None, fail_after: int | None = None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data) if length is None else length)}
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise KeyboardInterrupt
        return super().read(min(n, 4096))


@pytest.fixture
def known_md5(monkeypatch):
    monkeypatch.setattr(Variant, "md5", property(lambda self: hashlib.md5(PAYLOAD).hexdigest()))


def opener_for(response, calls=None):
    def opener(url, timeout):
        if calls is not None:
            calls.append(url)
        return response
    return opener


def leftovers(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_downloads_atomically_and_skips_a_good_file(tmp_path, known_md5):
    calls, seen = [], []
    path, fetched = download(VARIANT, tmp_path, opener=opener_for(Response(PAYLOAD), calls),
                             progress=lambda done, total: seen.append((done, total)))
    assert fetched and path == tmp_path / "breastmnist_64.npz" and path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["breastmnist_64.npz"]
    assert calls == [VARIANT.url] and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert path.stat().st_mode & 0o044  # readable like any other file, not mkstemp's 0600
    path2, fetched2 = download(VARIANT, tmp_path, opener=opener_for(Response(PAYLOAD), calls))
    assert (path2, fetched2) == (path, False) and len(calls) == 1
    _, fetched3 = download(VARIANT, tmp_path, force=True, opener=opener_for(Response(PAYLOAD), calls))
    assert fetched3 and len(calls) == 2


def test_md5_mismatch_saves_nothing_unless_overridden(tmp_path, known_md5):
    message = r"downloaded MD5 \w+ differs from \w+ \(medmnist.INFO\); nothing was saved \(.*--ignore-md5"
    with pytest.raises(DataError, match=message):
        download(VARIANT, tmp_path, opener=opener_for(Response(b"tampered")))
    assert leftovers(tmp_path) == []
    path, fetched = download(VARIANT, tmp_path, ignore_md5=True, opener=opener_for(Response(b"tampered")))
    assert fetched and path.read_bytes() == b"tampered"


def test_offline_fails_cleanly(tmp_path, known_md5):
    def offline(url, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    message = (r"cannot download https://zenodo.org/.*breastmnist_64.npz.*: Temporary failure in name resolution "
               r"\(check the network")
    with pytest.raises(DataError, match=message):
        download(VARIANT, tmp_path, opener=offline)
    assert leftovers(tmp_path) == []


def test_short_transfer_and_interruption_leave_nothing(tmp_path, known_md5):
    with pytest.raises(DataError, match=f"stopped after {len(PAYLOAD)} of {len(PAYLOAD) + 10} bytes"):
        download(VARIANT, tmp_path, opener=opener_for(Response(PAYLOAD, length=len(PAYLOAD) + 10)))
    with pytest.raises(KeyboardInterrupt):
        download(VARIANT, tmp_path, opener=opener_for(Response(PAYLOAD, fail_after=8192)))
    assert leftovers(tmp_path) == []


def test_unwritable_data_root(tmp_path, known_md5):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot create data root"):
        download(VARIANT, blocker / "root", opener=opener_for(Response(PAYLOAD)))


def test_mirror_url(monkeypatch):
    assert source_url(VARIANT) == VARIANT.url
    assert source_url(VARIANT, "file:///srv/medmnist/") == "file:///srv/medmnist/breastmnist_64.npz"
    monkeypatch.setenv("MEDFORMER_MEDMNIST_MIRROR", "https://mirror.example/mm")
    assert source_url(VARIANT) == "https://mirror.example/mm/breastmnist_64.npz"


def test_real_file_through_a_file_url(tmp_path, real_root):
    path, fetched = download(Variant("retinamnist", 28), tmp_path, mirror=real_root.as_uri())
    assert fetched and path.read_bytes() == (real_root / "retinamnist.npz").read_bytes()
    assert leftovers(tmp_path) == ["retinamnist.npz"]
