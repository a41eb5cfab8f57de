"""What the explorer's tests share: demo shapes images on disk (with their masks), and polling."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

SEED = 4242


def shapes_files(folder: Path, n: int = 4, seed: int = SEED) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """``n`` demo shapes images saved as PNG in ``folder``; their labels ``(n,)`` and masks ``(n, 64, 64)``."""
    from PIL import Image

    from salience.demo import data

    images, labels, masks = data.shapes(n, seed)
    paths = []
    for i in range(n):
        p = folder / f"shape{i}.png"
        Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(p)
        paths.append(p)
    return paths, labels, masks


def png_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def wait_job(get, answer: dict, timeout: float = 60.0) -> dict:
    """Poll ``api/jobs/ID`` with ``get(url) -> dict`` until the job has ended."""
    end = time.monotonic() + timeout
    while answer.get("state") in ("queued", "running"):
        assert time.monotonic() < end, f"job did not end in {timeout} s: {answer}"
        time.sleep(0.02)
        answer = get(f"api/jobs/{answer['job']}")
    return answer


def npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)
