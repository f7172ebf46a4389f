#!/usr/bin/python3
"""Golden gradients of EVERY parameter of the UNet and the CLIP text encoder (issue 15,
full-parameter training), read by tests/test_fullgrad.c:

    /usr/bin/python3 tools/ref/gen_fullgrad_golden.py [--diffusers /tmp/diffusers-0.19.3/src]

Networks, on a very small SD 1.x-topology config (the C test builds the same configs by hand):
  - diffusers 0.19.3 UNet2DConditionModel: block_out_channels (8, 16), CrossAttnDownBlock2D +
    DownBlock2D, UpBlock2D + CrossAttnUpBlock2D, layers_per_block 2, attention_head_dim 2 (heads),
    norm_num_groups 4, cross_attention_dim 16 (time embedding 32);
  - CLIPTextModel (the transformers 4.31 stand-in of gen_train_golden.py, itself checked there
    against real 4.31 goldens): vocab 64, width 16, 2 heads, 2 layers, MLP 64, 12 positions.
Weights: torch's default init, seeded, then every 1-D parameter (norm weights, biases) moved by
0.1 * N(0,1) so that none is the trivial 1 or 0. Inputs random; loss L = sum(R * out) with a random
R, so dL/dout = R; the reference runs in float64 (the float32 weights and inputs upcast), and the
same run in float32 is compared with it (metadata "f32_vs_f64/...": what torch float32 reaches).

Keys: unet/w/<diffusers key> (F32) weights, unet/g/<key> (F32, rounded from F64) gradients,
unet/in/{x (2,4,8,12), t (2), ctx (2,7,16), R (2,4,8,12)}, unet/eps (F32, from F64);
text/w/<key>, text/g/<key>, text/in/{ids (2,9) I32, R (2,9,16)}, text/out.
"""
import argparse, importlib, os, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import write_safetensors, versions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "fullgrad_golden.safetensors")
SEED = 1515

UNET_CFG = dict(sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(8, 16), layers_per_block=2, attention_head_dim=2,
                norm_num_groups=4, cross_attention_dim=16)
N, H, W, TK = 2, 8, 12, 7
TIMESTEPS = [999.0, 423.5]

TEXT_CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=12, layer_norm_eps=1e-5,
                hidden_act="quick_gelu", attention_dropout=0.0)
B, T = 2, 9


def perturb(model, torch, gen):
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def run(model, inputs, R, fwd, torch, dtype):
    """out, {name: grad} of L = sum(R * out) with the model and float inputs cast to dtype."""
    model = model.to(dtype)
    model.zero_grad(set_to_none=True)
    out = fwd(model, [x.to(dtype) if x.is_floating_point() else x for x in inputs])
    (R.to(dtype) * out).sum().backward()
    grads = {k: p.grad.detach().double().numpy().copy() for k, p in model.named_parameters()}
    return out.detach().double().numpy(), grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    a = ap.parse_args()
    import torch
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    import gen_unet_golden as gug
    import gen_train_golden as gtg
    UNet, _ = gug.import_unet(a.diffusers)
    gtg.torch, gtg.F = torch, torch.nn.functional
    CLIPTextModel = gtg.make_clip_classes()

    tensors, meta = {}, dict(versions(), diffusers="0.19.3 (source)", transformers="4.31 stand-in of gen_train_golden.py",
                             seed=str(SEED), loss="sum(R * out), float64 reference")

    # ---- UNet
    unet = UNet(**UNET_CFG)
    perturb(unet, torch, gen)
    unet_w = {k: v.detach().float().numpy().copy() for k, v in unet.state_dict().items()}
    x = torch.randn((N, 4, H, W), generator=gen)
    t = torch.tensor(TIMESTEPS, dtype=torch.float32)
    ctx = torch.randn((N, TK, UNET_CFG["cross_attention_dim"]), generator=gen)
    R = torch.randn((N, 4, H, W), generator=gen)

    def unet_fwd(m, ins):
        return m(ins[0], ins[1].float(), encoder_hidden_states=ins[2]).sample
    eps64, g64 = run(unet, [x, t, ctx], R, unet_fwd, torch, torch.float64)
    eps32, g32 = run(unet, [x, t, ctx], R, unet_fwd, torch, torch.float32)
    worst = max(g64, key=lambda k: rel_l2(g32[k], g64[k]))
    meta["f32_vs_f64/unet_eps"] = "%.2e" % rel_l2(eps32, eps64)
    meta["f32_vs_f64/unet_worst_grad"] = "%.2e (%s)" % (rel_l2(g32[worst], g64[worst]), worst)
    for k, v in unet_w.items():
        tensors["unet/w/" + k] = v
    for k, v in g64.items():
        tensors["unet/g/" + k] = v.astype(np.float32)
    tensors.update({"unet/in/x": x.numpy(), "unet/in/t": t.numpy(), "unet/in/ctx": ctx.numpy(),
                    "unet/in/R": R.numpy(), "unet/eps": eps64.astype(np.float32)})
    print("unet: %d parameter tensors, %d values; float32 vs float64: eps %s, worst gradient %s" % (
        len(g64), sum(v.size for v in g64.values()), meta["f32_vs_f64/unet_eps"], meta["f32_vs_f64/unet_worst_grad"]))

    # ---- CLIP text encoder
    te = CLIPTextModel(TEXT_CFG)
    perturb(te, torch, gen)
    te_w = {k: v.detach().float().numpy().copy() for k, v in te.state_dict().items() if "position_ids" not in k}
    ids = torch.randint(0, TEXT_CFG["vocab_size"], (B, T), generator=gen)
    Rt = torch.randn((B, T, TEXT_CFG["hidden_size"]), generator=gen)

    def te_fwd(m, ins):
        return m(ins[0])[0]
    out64, tg64 = run(te, [ids], Rt, te_fwd, torch, torch.float64)
    out32, tg32 = run(te, [ids], Rt, te_fwd, torch, torch.float32)
    # k_proj.bias moves every logit of a query by the same q.b: the softmax cancels it, so its
    # gradient is 0 in exact arithmetic (float64 here: ~1e-17; float32: rounding noise)
    kb = [k for k in tg64 if k.endswith("k_proj.bias")]
    worst = max((k for k in tg64 if k not in kb), key=lambda k: rel_l2(tg32[k], tg64[k]))
    meta["f32_vs_f64/text_k_proj_bias_max_abs"] = "%.2e (float64 %.2e)" % (
        max(np.abs(tg32[k]).max() for k in kb), max(np.abs(tg64[k]).max() for k in kb))
    meta["f32_vs_f64/text_out"] = "%.2e" % rel_l2(out32, out64)
    meta["f32_vs_f64/text_worst_grad"] = "%.2e (%s)" % (rel_l2(tg32[worst], tg64[worst]), worst)
    for k, v in te_w.items():
        tensors["text/w/" + k] = v
    for k, v in tg64.items():
        tensors["text/g/" + k] = v.astype(np.float32)
    tensors.update({"text/in/ids": ids.numpy().astype(np.int32), "text/in/R": Rt.numpy(),
                    "text/out": out64.astype(np.float32)})
    print("text: %d parameter tensors, %d values; float32 vs float64: out %s, worst gradient %s; k_proj.bias %s" % (
        len(tg64), sum(v.size for v in tg64.values()), meta["f32_vs_f64/text_out"], meta["f32_vs_f64/text_worst_grad"],
        meta["f32_vs_f64/text_k_proj_bias_max_abs"]))

    n = write_safetensors(OUT, tensors, meta)
    print("wrote %s (%d bytes)" % (OUT, n))


if __name__ == "__main__":
    main()
