"""What one run on the Ray engine costs beside the local engine (session 53, helper citime53): the import, a local
cluster's start (as tests/test_runs_ray.py's module fixture: 2 CPUs), three runs of tests/test_runs_ray.py's
``_run`` (demo:shapes, 20 PNG images, vanilla and Grad-CAM, top 2, shards of 8, batches of 4) on Ray, the same run on
the local engine, and the shutdown; seconds of wall clock each. Run on one core:
``taskset -c 1 python benchmarks/ray-run-cost-s53.py``."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

t0 = time.perf_counter()
import ray  # noqa: E402 - timed
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import salience  # noqa: E402


def _images(root: Path) -> Path:
    """tests/test_runs_ray.py's 20 demo shapes (seed 3), as PNG files in root/imgs."""
    imgs, _, _ = salience.data.shapes(20, seed=3)
    (root / "imgs").mkdir()
    for i in range(20):
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            root / "imgs" / f"{i:03d}.png")
    return root / "imgs"


def _run(folder: Path, out: Path, engine: str) -> float:
    start = time.perf_counter()
    salience.explain_dataset("demo:shapes", folder, ["vanilla", "gradcam"], out, top=2, shard_size=8, batch_size=4,
                             workers=0, engine=engine)
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    print(f"import ray, torch, salience: {time.perf_counter() - t0:.1f} s", flush=True)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init (a local cluster of 2 CPUs): {time.perf_counter() - start:.1f} s", flush=True)
    root = Path(tempfile.mkdtemp())
    folder = _images(root)
    for k in range(3):
        print(f"run {k} on ray: {_run(folder, root / f'ray{k}', 'ray'):.1f} s", flush=True)
    print(f"the same run on the local engine: {_run(folder, root / 'local', 'local'):.2f} s", flush=True)
    start = time.perf_counter()
    ray.shutdown()
    print(f"ray.shutdown: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
