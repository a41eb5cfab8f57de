"""Review of the merge 08c218c (16-bit colour PNGs read twice, _extra_state, whole-float sizes): each test here
failed against the merge."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from salience.loading import load_image

cv2 = pytest.importorskip("cv2")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_16_bit_png_from_a_pipe_is_read_once_not_waited_for(tmp_path):
    """A pipe (bash's ``<(curl ...)``, a named pipe) gives its bytes once: the merge opened a 16-bit colour PNG a
    second time for its low bytes and waited for ever on the pipe (an 8-bit one, or any before the merge, loaded)."""
    a = np.random.default_rng(3).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    a[a % 257 == 0] += 1
    assert cv2.imwrite(str(tmp_path / "s.png"), a[..., ::-1].copy())
    body = (tmp_path / "s.png").read_bytes()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(body)

    got: dict = {}

    def read() -> None:
        try:
            got["x"] = load_image(fifo)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            got["x"] = e

    threads = [threading.Thread(target=write, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    threads[1].join(10)
    if threads[1].is_alive():  # unblock the reader waiting on the pipe: a writer that closes at once (EOF)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert "x" in got, "load_image waited on the pipe for a second reading"
    assert isinstance(got["x"], torch.Tensor), got["x"]
    want = torch.from_numpy((a.astype(np.float64) / 65535).astype(np.float32)).permute(2, 0, 1)
    assert torch.equal(got["x"], want)


def test_a_meta_tensor_size_or_mean_is_refused_as_bad_input():
    """The merge read a tensor ``size`` with ``.tolist()``, which a meta tensor answers with NotImplementedError
    (before it, any tensor size was refused with a SalienceError); means and the ModelInfo's own numbers likewise."""
    from salience import SalienceError
    from salience._core.info import ModelInfo
    from salience.loading import normalize_input, with_preprocessing

    info = ModelInfo(name="m", input_size=(8, 8))
    meta = torch.tensor([8.0, 8.0], device="meta")
    for kwargs in ({"size": torch.tensor(8, device="meta")}, {"size": meta}, {"mean": meta[:1]}, {"std": meta[:1]}):
        with pytest.raises(SalienceError, match=rf"{next(iter(kwargs))} must be"):
            with_preprocessing(info, **kwargs)
    for bad in (ModelInfo(name="m", input_size=meta), ModelInfo(name="m", mean=meta[:1])):
        with pytest.raises(SalienceError, match=r"normalize_input: the ModelInfo's"):
            normalize_input(torch.rand(3, 4, 4), bad)
