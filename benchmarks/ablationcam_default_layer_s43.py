"""Ablation-CAM at its default layer (resnet50's layer4[-1]), 8 images at 224, one thread: the salience
at PYTHONPATH's call time (a child per measurement: `--src OLD,NEW` alternates two source trees per round).

flock /tmp/bench.lock taskset -c 1 python benchmarks/ablationcam_default_layer_s43.py \
    --src /tmp/rvabl-old/src,src --rounds 3 --precision bf16 --images 2
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch, torchvision
torch.set_num_threads(1)
import salience
prec = sys.argv[1]
torch.manual_seed(0)
m = torchvision.models.resnet50(weights=None).eval()
x = torch.randn(int(sys.argv[2]), 3, 224, 224)
kw = dict(precision="bf16", memory_format="channels_last") if prec == "bf16" else {}
with torch.no_grad():
    m(x[:1])  # warm-up (one pass)
t = time.perf_counter()
cam = salience.ablationcam(m, x, **kw)
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "sum": float(cam.double().sum())}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--src", default="/tmp/rvabl-old/src,src")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--precision", default="bf16,fp32")
    a = p.parse_args()
    srcs = a.src.split(",")
    rows = []
    for r in range(a.rounds):
        order = srcs if r % 2 == 0 else srcs[::-1]
        for prec in a.precision.split(","):
            for src in order:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
                out = subprocess.run([sys.executable, "-c", CHILD, prec, str(a.images)], env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr)
                d = json.loads(out.stdout.strip().splitlines()[-1])
                d.update(round=r + 1, src=src, precision=prec)
                rows.append(d)
                print(json.dumps(d), flush=True)
    for prec in a.precision.split(","):
        for r in range(a.rounds):
            t = {d["src"]: d["s"] for d in rows if d["round"] == r + 1 and d["precision"] == prec}
            print(f"{prec} round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
                  + f"; new/old {t[srcs[1]] / t[srcs[0]]:.3f}")


if __name__ == "__main__":
    main()
