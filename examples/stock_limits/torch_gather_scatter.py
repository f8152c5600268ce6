"""What the stock layer does with padded batches: the measurements behind the README table "Why maskbn"."""

import numpy as np
import torch

torch.manual_seed(0)
C = 4


def gbs(bn, x, m):
    y = torch.zeros_like(x)
    y[m] = bn(x[m])
    return y


for n_real in (1, 0):
    bn = torch.nn.BatchNorm1d(C)
    x = torch.randn(4, 16, C)
    m = torch.zeros(4, 16, dtype=torch.bool)
    m.view(-1)[:n_real] = True
    try:
        gbs(bn, x, m)
        print(
            f"torch gather/BN/scatter {n_real} real rows: ok, running_mean {bn.running_mean[:2].tolist()} var {bn.running_var[:2].tolist()}"
        )
    except Exception as e:
        print(f"torch gather/BN/scatter {n_real} real rows raises", type(e).__name__, str(e)[:90])
for off in (1e4, 1e5, 1e6):
    n = 2**20
    x = torch.randn(n, C) + off
    m = torch.ones(n, dtype=torch.bool)
    m[n // 2 :] = torch.rand(n - n // 2) < 0.5
    bn = torch.nn.BatchNorm1d(C, momentum=1.0)
    bn(x[m])
    xr = x[m].double()
    em = (bn.running_mean.double() - xr.mean(0)).abs().max().item()
    ev = (bn.running_var.double() / xr.var(0) - 1).abs().max().item()
    print(
        f"torch BN on gathered rows offset {off:g}: mean err {em:.3g} ({em / np.spacing(np.float32(off)):.1f} ulp), var rel err {ev:.3g}"
    )
