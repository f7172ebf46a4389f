#!/usr/bin/python3
"""Golden for models/optim.c (tests/test_train.c): torch.optim.AdamW, Debian's python3-torch
(1.13, CPU, default single-tensor path), 6 steps on three parameter groups with their own lr and
weight decay and a linear lr decay as diffusers' get_scheduler('linear') gives it; one group's
gradient is zero (a concept row no prompt uses: only the decay moves it).

    /usr/bin/python3 tools/ref/gen_adamw_golden.py      -> tests/data/adamw_golden.safetensors
Keys: p0.<g> (initial), grad<k>.<g> (gradient of step k), p<k>.<g> (after step k), lr<k> [3] F64.
"""
import os, sys
import numpy as np
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_safetensors, versions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.manual_seed(7)
shapes = [(5, 33), (4, 17), (19, 4)]
params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
groups = [{"params": [params[0]], "lr": 1e-3, "weight_decay": 0.05},
          {"params": [params[1]], "lr": 1e-5},
          {"params": [params[2]], "lr": 1e-4}]
opt = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.01, betas=(0.9, 0.999))
total = 10.0
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, float(total - s) / float(max(1, total))))
out = {}
for g, p in enumerate(params):
    out[f"p0.{g}"] = p.detach().clone()
for k in range(1, 7):
    out[f"lr{k}"] = np.array([grp["lr"] for grp in opt.param_groups], dtype=np.float64)
    for g, p in enumerate(params):
        grad = torch.randn(p.shape) * (10.0 ** (-g))
        if g == 0 and k % 2 == 0:
            grad[0] = 0.0          # a row without gradient this step
        p.grad = grad
        out[f"grad{k}.{g}"] = grad.clone()
    opt.step()
    sched.step()
    for g, p in enumerate(params):
        out[f"p{k}.{g}"] = p.detach().clone()
meta = versions()
meta["what"] = "torch.optim.AdamW, 6 steps, 3 groups (lr 1e-3 wd 0.05; 1e-5 wd 0.01; 1e-4 wd 0.01), linear decay over 10"
write_safetensors(os.path.join(ROOT, "tests/data/adamw_golden.safetensors"), out, meta)
print("wrote", len(out), "tensors")
