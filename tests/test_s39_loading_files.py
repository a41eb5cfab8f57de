"""A file's first bytes are read by one helper, ``salience._core.files.file_start``: the weights loader (a safetensors
header whatever the file's name, a zip archive or a pickle) and the image loader (a TIFF that Pillow cannot decode)
read them through it; ``loading.models`` had ``_is_safetensors`` and ``_file_start`` reading them in two ways. The
helper's test failed before (it did not exist)."""
from __future__ import annotations

import pytest
import torch

from salience import SalienceError
from salience._core import files
from salience.loading import images, load_image, models, read_state_dict


def test_file_start_reads_the_first_bytes_or_none(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"0123456789")
    assert files.file_start(p, 4) == b"0123" and files.file_start(str(p), 9) == b"012345678"
    assert files.file_start(p, 40) == b"0123456789"  # shorter than asked: what there is
    (tmp_path / "empty").write_bytes(b"")
    for nothing in (tmp_path / "empty", tmp_path / "missing", tmp_path):
        assert files.file_start(nothing, 4) == b""


def test_the_loaders_read_first_bytes_through_it(tmp_path):
    assert not hasattr(models, "_file_start")
    assert models.file_start is files.file_start and images.file_start is files.file_start
    safetensors = pytest.importorskip("safetensors.torch")
    p = tmp_path / "weights.bin"  # a safetensors file, told by its header, not its name
    safetensors.save_file({"w": torch.arange(3.0)}, str(p))
    assert torch.equal(read_state_dict(p)["w"], torch.arange(3.0))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(SalienceError, match=r"the file is empty"):
        read_state_dict(empty)
    tiff = tmp_path / "odd.tif"
    tiff.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(SalienceError, match=r"a TIFF file whose samples PIL cannot decode"):
        load_image(tiff)
