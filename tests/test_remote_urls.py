"""Object storage URLs other than s3:// and gs:// (``abfs://``, ``hdfs://``), through pyarrow's own URI
parser: the URLs a listing returns must name the same storage as the URL listed (an Azure URL's
account lives in its authority, an HDFS URL's namenode too), and a storage that cannot be opened is
one line saying what to check. No Azure or HDFS server runs here (neither has an emulator on PyPI):
the listing runs on a local tree laid out as pyarrow lays out the remote one, at the path pyarrow's
``FileSystem.from_uri`` gives for the URL."""
from __future__ import annotations

import pytest

from salience.loading import remote

pafs = pytest.importorskip("pyarrow.fs")  # a dependency of the runs extra (in the test extra)

ABFS = ["abfs://images@acct.dfs.core.windows.net/val/sub/",  # container@account (ADLS Gen2 form)
        "abfss://acct.dfs.core.windows.net/images/val/sub",  # account, container in the path
        "abfs://acct:a2V5@127.0.0.1:10000/images/val/sub/"]  # an Azure-compatible server (Azurite's form)


def _tree(tmp_path, path: str) -> None:
    """Three files at ``path`` (a path in the remote filesystem) below ``tmp_path``, one deeper."""
    root = tmp_path / path.strip("/")
    (root / "deep").mkdir(parents=True)
    for name in ("b.jpg", "a.jpg", "deep/c.png", "notes.txt"):
        (root / name).write_bytes(b"x")


def _listed(monkeypatch, tmp_path, url: str, path: str) -> list[str]:
    _tree(tmp_path, path)
    local = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    monkeypatch.setattr(remote, "filesystem", lambda u: (local, path if u == url else None))
    return remote.list_files(url, (".jpg", ".png"))


@pytest.mark.parametrize("url", ABFS)
def test_abfs_listing_keeps_the_account(monkeypatch, tmp_path, url):
    fs, path = pafs.FileSystem.from_uri(url)  # pyarrow's parse: no connection is made
    assert type(fs).__name__ == "AzureFileSystem"
    got = _listed(monkeypatch, tmp_path, url, path)
    base = url.rstrip("/")
    assert got == [f"{base}/a.jpg", f"{base}/b.jpg", f"{base}/deep/c.png"]
    for u, name in zip(got, ("a.jpg", "b.jpg", "deep/c.png")):
        fs2, p2 = pafs.FileSystem.from_uri(u)  # each listed URL opens the same account, at the file's path
        assert fs2.equals(fs) and p2.strip("/") == f"{path.strip('/')}/{name}"


def test_hdfs_listing_keeps_the_namenode(monkeypatch, tmp_path):
    url = "hdfs://namenode:8020/data/val/"
    got = _listed(monkeypatch, tmp_path, url, "/data/val/")  # the path pyarrow gives (host and port apart)
    assert got == ["hdfs://namenode:8020/data/val/a.jpg", "hdfs://namenode:8020/data/val/b.jpg",
                   "hdfs://namenode:8020/data/val/deep/c.png"]


def test_a_query_stays_at_the_end(monkeypatch, tmp_path):
    url = "abfs://images@acct.dfs.core.windows.net/val?credential_kind=cli"
    fs, path = pafs.FileSystem.from_uri(url)
    got = _listed(monkeypatch, tmp_path, url, path)
    assert got[0] == "abfs://images@acct.dfs.core.windows.net/val/a.jpg?credential_kind=cli"
    assert pafs.FileSystem.from_uri(got[0])[1] == "images/val/a.jpg"


def test_hdfs_that_cannot_start_is_one_line_saying_what_it_needs():
    """pyarrow's HDFS client needs Java and libhdfs; without them its error lists every path it tried
    to load libjvm from (about a hundred lines). With them, nothing answers at this address either."""
    remote._CACHE.clear()
    with pytest.raises(remote.StorageError) as e:
        remote.list_files("hdfs://127.0.0.1:1/data/", (".jpg",))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hdfs://127.0.0.1:1/data/: cannot ")
    assert "libhdfs" in msg and "JAVA_HOME" in msg


def test_abfs_glob_matches_the_listed_urls(monkeypatch, tmp_path):
    """A glob is listed from its fixed prefix and matched against the listed URLs: both must keep the
    account for anything to match."""
    base = "abfs://images@acct.dfs.core.windows.net/val/sub"
    _, path = pafs.FileSystem.from_uri(base)
    _listed(monkeypatch, tmp_path, base, path)
    assert remote.glob(base + "/*.jpg") == [f"{base}/a.jpg", f"{base}/b.jpg"]
    assert remote.glob(base + "/**/*.png") == [f"{base}/deep/c.png"]
