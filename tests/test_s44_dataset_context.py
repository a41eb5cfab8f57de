"""Session 44: one check, for CUDA and the CPU alike, of whether a worker started afresh (a forkserver's) gets the
run's dataset and decodes it as the run's own process would; where not, the workers fork (CUDA's device stood in
for: no GPU here; the decision does not touch CUDA)."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

import salience
import salience.runs.dataset as run_dataset
from test_s40_run_bf16 import images, net
from test_s43_dataset import _Unpicklable

CUDA = torch.device("cuda", 0)
KW = dict(batch_size=2, shard_size=2, target=1, model_spec="net3", overwrite=True)


class _Opener:
    """A third-party image opener (what ``pillow_heif.register_heif_opener()`` registers)."""


def test_a_cuda_run_starts_a_forkserver_only_where_its_worker_would_decode_alike(monkeypatch):
    """The CUDA path asked only whether the dataset pickles: a dataset that does not come back from its pickle, a
    class of an interactive ``__main__``, PIL's truncated-images setting or a third-party opener all got a
    forkserver. Each now forks, as on the CPU; a plain dataset, and one over the pickle limit, still get the
    forkserver."""
    from PIL import Image, ImageFile

    Image.init()
    assert run_dataset.loader_context(CUDA, 1, [0]) == "forkserver"
    assert run_dataset.loader_context(CUDA, 0, [0]) is None
    assert run_dataset.loader_context(CUDA, 1, [lambda: 0]) is None  # as before: it does not pickle
    assert run_dataset.loader_context(CUDA, 1, [_Unpicklable(1, 2)]) is None  # pickles, does not come back
    monkeypatch.setattr(run_dataset, "PICKLE_LIMIT", 1 << 10)  # over the limit: the CPU's cost rule, not CUDA's
    assert run_dataset.loader_context(CUDA, 1, np.zeros(4096)) == "forkserver"  # (session 44's review)
    monkeypatch.setattr(run_dataset, "PICKLE_LIMIT", 64 << 20)
    with monkeypatch.context() as m:
        m.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        assert run_dataset.loader_context(CUDA, 1, [0]) is None
    with monkeypatch.context() as m:
        m.setitem(Image.OPEN, "S44FAKE", (_Opener, None))
        assert run_dataset.loader_context(CUDA, 1, [0]) is None
    with monkeypatch.context() as m:  # a notebook: a class defined in its cells pickles by a name no worker has
        main = types.ModuleType("__main__")
        cls = type("Cell", (), {"__module__": "__main__"})
        main.Cell = cls
        m.setitem(sys.modules, "__main__", main)
        assert run_dataset.loader_context(CUDA, 1, [cls()]) is None
    assert run_dataset.loader_context(CUDA, 1, [0]) == "forkserver"


def test_a_cuda_run_under_pils_truncated_images_setting_maps_every_image_as_without_workers(tmp_path, monkeypatch):
    """``ImageFile.LOAD_TRUNCATED_IMAGES = True`` in the run's process, the device stood in for CUDA: the worker read
    the truncated JPEG of the third batch as an error row (a forkserver's worker has PIL's defaults) where the run
    without workers maps it; now the worker forks and the store equals the run's without workers."""
    from PIL import Image, ImageFile

    files = images(tmp_path / "imgs", n=6)
    jpeg = tmp_path / "imgs" / "4.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:-600])
    files[4] = jpeg
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    real, chosen = run_dataset.loader_context, []

    def on_cuda(device, workers, *rest):
        context = real(CUDA, workers, *rest)
        chosen.extend([context] if workers else [])
        return context

    monkeypatch.setattr(run_dataset, "loader_context", on_cuda)
    model = net()
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "none", workers=0, **KW)
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "workers", workers=1, **KW)
    assert chosen == [None]
    a, b = salience.open_run(tmp_path / "none"), salience.open_run(tmp_path / "workers")
    assert a.table["error"].to_pylist() == [None] * 6
    assert b.table["error"].to_pylist() == a.table["error"].to_pylist()
    for i in range(6):
        assert np.array_equal(a.map(i, "vanilla"), b.map(i, "vanilla")), i


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_both_devices_ask_the_same_question(monkeypatch, device):
    """Where the one check says no, neither device starts a forkserver; where it says yes, both do (the CPU with a
    large kept heap and a running server)."""
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: 1 << 30)
    monkeypatch.setattr(run_dataset, "_forkserver_ready", lambda: True)
    for answer in (False, True):
        monkeypatch.setattr(run_dataset, "_afresh_decodes_alike", lambda dataset, cuda=False, a=answer: a)
        assert run_dataset.loader_context(torch.device(device), 1, [0]) == ("forkserver" if answer else None)
