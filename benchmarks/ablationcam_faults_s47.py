"""Session 47 (issue 15): Ablation-CAM's time against the tree on PYTHONPATH, with the process's page faults and
glibc heap around the timed call: why session 46's code was 1.5-4.3 % slower than 9fa9005's (benchmarks/cam-ab-s46.md).

    PYTHONPATH=<tree>/src taskset -c 1 python benchmarks/ablationcam_faults_s47.py [METHOD] [LAYER] [B]

One warm call of one image, then one timed call of B images (default 8) of resnet50 (random weights) at 224 px, fp32
defaults, one thread; prints one JSON line: seconds, minor page faults during the timed call, and the CPU time split
into user and system time."""
import json
import os
import resource
import sys
import time

import torch
import torchvision

import salience

torch.set_num_threads(1)
method = sys.argv[1] if len(sys.argv) > 1 else "ablationcam"
layer = sys.argv[2] if len(sys.argv) > 2 else "layer1.0.conv1"
b = int(sys.argv[3]) if len(sys.argv) > 3 else 8
m = torchvision.models.resnet50().eval()
x = torch.rand(b, 3, 224, 224, generator=torch.Generator().manual_seed(0))
f = getattr(salience, method)
f(m, x[:1], layer=layer)  # warm
r0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
f(m, x, layer=layer)
dt = time.perf_counter() - t
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tree": os.path.dirname(os.path.dirname(salience.__file__)), "method": method, "seconds": round(dt, 3),
                  "minflt": r1.ru_minflt - r0.ru_minflt, "user_s": round(r1.ru_utime - r0.ru_utime, 3),
                  "sys_s": round(r1.ru_stime - r0.ru_stime, 3), "maxrss_mib": round(r1.ru_maxrss / 1024, 1),
                  "load": open("/proc/loadavg").read().split()[0]}))
