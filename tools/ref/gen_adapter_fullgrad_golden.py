#!/usr/bin/python3
"""Golden gradients for T2I-Adapter training (issue 15, `mixshow pretrain --stage adapters`), read by
tests/test_fullgrad.c:

    /usr/bin/python3 tools/ref/gen_adapter_fullgrad_golden.py [--diffusers /tmp/diffusers-0.19.3/src]

(the source tree of diffusers v0.19.3: `git archive v0.19.3 src | tar -x -C /tmp/diffusers-0.19.3`).

Two diffusers 0.19.3 networks on very small configs (the C test builds the same configs by hand):
  - "a": UNet2DConditionModel with down blocks DownBlock2D, CrossAttnDownBlock2D,
    CrossAttnDownBlock2D (up: CrossAttnUp x2, UpBlock2D), widths (4, 4, 8), 1 layer per block,
    2 heads, 2 groups, cross-attention 16; random down_block_additional_residuals (one per down
    block, the shape of that block's output: after the downsampler for a DownBlock2D, before it
    for a CrossAttnDownBlock2D). L = sum(R * eps): the residuals' gradients a/dres/<i>.
    It covers a DownBlock2D with a downsampler and a last CrossAttnDownBlock2D.
  - "b": T2IAdapter (full_adapter) in_channels 2, channels (4, 8, 8) (block 1 has an in_conv,
    block 2 pools straight in), num_res_blocks 2, downscale_factor 4, feeding a UNet with down blocks
    CrossAttnDownBlock2D x2, DownBlock2D (SD's order) of widths (4, 8, 8), 2 layers per block:
        feats = adapter(cond); eps = unet(x, t, ctx, down_block_additional_residuals=feats)
        L = sum(R * eps)
    as StableDiffusionAdapterPipeline adds them (scale 1). Gradients of every adapter parameter,
    of the residuals (the UNet's share of each feature's gradient: feature i also feeds block
    i + 1) and of cond.
Weights: torch's default init, seeded, then every 1-D parameter moved by 0.1 * N(0,1) (adapter
biases too). The reference runs in float64 (float32 weights and inputs upcast); the same in float32
is compared with it (metadata "f32_vs_f64/...").

Keys: a/w/<unet key>, a/in/{x (2,4,8,12), t (2), ctx (2,5,16), R, res/<i>}, a/eps, a/dres/<i>;
b/unet/<unet key>, b/w/<adapter key>, b/g/<adapter key>, b/in/{cond (2,2,32,48), x, t, ctx, R},
b/feat/<i>, b/dfeat/<i>, b/dcond, b/eps. All F32 (gradients and outputs rounded from F64).
"""
import argparse, importlib, os, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import write_safetensors, versions  # noqa: E402
from gen_fullgrad_golden import perturb, rel_l2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "adapter_fullgrad_golden.safetensors")
SEED = 1517

UNET_B = dict(sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              block_out_channels=(4, 8, 8), layers_per_block=2, attention_head_dim=2,
              norm_num_groups=2, cross_attention_dim=16)
UNET_A = dict(UNET_B, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              block_out_channels=(4, 4, 8), layers_per_block=1)
ADAPTER = dict(in_channels=2, channels=[4, 8, 8], num_res_blocks=2, downscale_factor=4, adapter_type="full_adapter")
N, H, W, TK = 2, 8, 12, 5
TIMESTEPS = [811.0, 97.25]


def exact_scores(torch):
    """Debian's torch 1.13 baddbmm with beta = 0 computes beta * r + alpha * q k^T on a result it
    never initialised: where that memory holds NaN/inf, 0 * NaN leaves NaN (2 in 300 calls of shape
    (4,6,8) x (4,8,6) measured here, and about every other forward of these tiny UNets), so
    gen_unet_golden's zeroed input does not help. The attention scores are taken as alpha * bmm."""
    ap = sys.modules["diffusers.models.attention_processor"]
    base = ap.torch

    class Scores:
        def __getattr__(self, name):
            return getattr(base, name)

        @staticmethod
        def baddbmm(inp, a, b, beta=1, alpha=1):
            return alpha * torch.bmm(a, b) + (beta * inp if beta else 0)
    ap.torch = Scores()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    a = ap.parse_args()
    import torch
    import gen_unet_golden as gug
    UNet, _ = gug.import_unet(a.diffusers)
    exact_scores(torch)
    T2IAdapter = importlib.import_module("diffusers.models.adapter").T2IAdapter
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    T, meta = {}, dict(versions(), diffusers="0.19.3 (source)", seed=str(SEED), loss="sum(R * eps), float64 reference")
    t = torch.tensor(TIMESTEPS, dtype=torch.float32)

    # ---- a: the UNet's gradient w.r.t. its down-block residuals
    ua = UNet(**UNET_A)
    perturb(ua, torch, gen)
    x = torch.randn((N, 4, H, W), generator=gen)
    ctx = torch.randn((N, TK, 16), generator=gen)
    R = torch.randn((N, 4, H, W), generator=gen)
    shapes, h, w = [], H, W
    for i, (kind, C) in enumerate(zip(UNET_A["down_block_types"], UNET_A["block_out_channels"])):
        last = i == len(UNET_A["block_out_channels"]) - 1
        hn, wn = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1      # 3x3 stride 2 pad 1
        shapes.append((N, C, h, w) if kind != "DownBlock2D" or last else (N, C, hn, wn))
        h, w = (h, w) if last else (hn, wn)
    res = [0.5 * torch.randn(s, generator=gen) for s in shapes]

    def run_a(dt):
        m = ua.to(dt)
        rs = [r.to(dt).clone().requires_grad_(True) for r in res]
        eps = m(x.to(dt), t.to(dt), encoder_hidden_states=ctx.to(dt), down_block_additional_residuals=list(rs)).sample
        (R.to(dt) * eps).sum().backward()
        return eps.detach().double().numpy(), [r.grad.detach().double().numpy() for r in rs]
    e64, d64 = run_a(torch.float64)
    e32, d32 = run_a(torch.float32)
    for k, v in ua.state_dict().items():
        T["a/w/" + k] = v.detach().float().numpy().copy()
    T.update({"a/in/x": x.numpy(), "a/in/t": t.numpy(), "a/in/ctx": ctx.numpy(), "a/in/R": R.numpy(),
              "a/eps": e64.astype(np.float32)})
    for i in range(len(res)):
        T["a/in/res/%d" % i] = res[i].numpy()
        T["a/dres/%d" % i] = d64[i].astype(np.float32)
    meta["f32_vs_f64/a_dres"] = " ".join("%.2e" % rel_l2(d32[i], d64[i]) for i in range(len(res)))
    print("a: residual shapes %s; float32 vs float64 d residual %s" % (shapes, meta["f32_vs_f64/a_dres"]))

    # ---- b: adapter -> UNet, every adapter parameter
    ub = UNet(**UNET_B)
    perturb(ub, torch, gen)
    ad = T2IAdapter(**ADAPTER)
    perturb(ad, torch, gen)
    f = ADAPTER["downscale_factor"]
    cond = torch.rand((N, ADAPTER["in_channels"], H * f, W * f), generator=gen)
    xb = torch.randn((N, 4, H, W), generator=gen)
    ctxb = torch.randn((N, TK, 16), generator=gen)
    Rb = torch.randn((N, 4, H, W), generator=gen)

    def run_b(dt):
        m, u = ad.to(dt), ub.to(dt)
        m.zero_grad(set_to_none=True)
        c = cond.to(dt).clone().requires_grad_(True)
        feats = m(c)
        res = [ft + 0 for ft in feats]   # feature i also feeds block i+1: the UNet's share of its gradient
        for r in res:
            r.retain_grad()
        eps = u(xb.to(dt), t.to(dt), encoder_hidden_states=ctxb.to(dt),
                down_block_additional_residuals=list(res)).sample
        (Rb.to(dt) * eps).sum().backward()
        g = {k: p.grad.detach().double().numpy().copy() for k, p in m.named_parameters()}
        return (eps.detach().double().numpy(), [ft.detach().double().numpy() for ft in feats],
                [r.grad.detach().double().numpy() for r in res], c.grad.detach().double().numpy(), g)
    e64, f64, df64, dc64, g64 = run_b(torch.float64)
    e32, _, df32, dc32, g32 = run_b(torch.float32)
    worst = max(g64, key=lambda k: rel_l2(g32[k], g64[k]))
    meta["f32_vs_f64/b_worst_grad"] = "%.2e (%s)" % (rel_l2(g32[worst], g64[worst]), worst)
    meta["f32_vs_f64/b_dcond"] = "%.2e" % rel_l2(dc32, dc64)
    for k, v in ub.state_dict().items():
        T["b/unet/" + k] = v.detach().float().numpy().copy()
    for k, v in ad.state_dict().items():
        T["b/w/" + k] = v.detach().float().numpy().copy()
    for k, v in g64.items():
        T["b/g/" + k] = v.astype(np.float32)
    T.update({"b/in/cond": cond.numpy(), "b/in/x": xb.numpy(), "b/in/t": t.numpy(), "b/in/ctx": ctxb.numpy(),
              "b/in/R": Rb.numpy(), "b/eps": e64.astype(np.float32), "b/dcond": dc64.astype(np.float32)})
    for i in range(len(f64)):
        T["b/feat/%d" % i] = f64[i].astype(np.float32)
        T["b/dfeat/%d" % i] = df64[i].astype(np.float32)
    print("b: %d adapter tensors, %d values; float32 vs float64: worst gradient %s, dcond %s" % (
        len(g64), sum(v.size for v in g64.values()), meta["f32_vs_f64/b_worst_grad"], meta["f32_vs_f64/b_dcond"]))
    assert all(np.isfinite(v).all() for v in T.values()), "a golden value is not finite"
    n = write_safetensors(OUT, T, meta)
    print("wrote %s (%d bytes)" % (OUT, n))


if __name__ == "__main__":
    main()
