"""A Hugging Face hub cache written by hand, in the layout ``huggingface_hub`` writes when it
downloads (``file_download.hf_hub_download``; see its docs, "Manage huggingface_hub cache-system")::

    CACHE/models--ORG--NAME/
        blobs/<hash>                   each file's bytes once: the git blob sha1 of a regular file,
                                       the sha256 of an LFS file (weights)
        refs/main, refs/<tag>          the commit hash that branch or tag points to (no newline)
        snapshots/<commit>/<file>      relative symlinks ../../blobs/<hash>

Tests point ``HF_HUB_CACHE`` (or ``HF_HOME``) at ``CACHE`` and load by model id, offline: nothing
here can be downloaded, and this is how the files of a real ``hf download`` lie on disk.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Iterable, Optional

# Extensions the Hub stores with Git LFS (its default .gitattributes): their blobs are named by sha256.
_LFS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack"}


def _blob_name(name: str, data: bytes) -> str:
    if Path(name).suffix in _LFS:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id of a file


def commit_hash(label: str) -> str:
    """A fixed 40-hex commit id for ``label``."""
    return hashlib.sha1(label.encode()).hexdigest()


def add_snapshot(cache: Path, repo_id: str, folder: Path, commit: str, refs: Iterable[str] = ("main",),
                 names: Optional[Iterable[str]] = None) -> Path:
    """Put the files of ``folder`` (or only ``names``) into ``cache`` as the snapshot ``commit`` of
    the model repo ``repo_id``, with the branches / tags ``refs`` pointing to it. Returns the
    snapshot folder."""
    root = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(Path(folder).iterdir()):
        if names is not None and f.name not in names:
            continue
        data = f.read_bytes()
        blob = root / "blobs" / _blob_name(f.name, data)
        if not blob.exists():
            blob.write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / f.name)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


def forbid_network(monkeypatch) -> list:
    """Any attempt to open a connection (the hub, a proxy) raises, and is recorded in the list
    returned: a library that swallows the error (huggingface_hub's best-effort telemetry does) still
    leaves its attempt there for the test to see."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args!r} {kwargs!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts
