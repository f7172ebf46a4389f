#!/usr/bin/python3
"""Golden gradients of EVERY parameter of an AutoencoderKL (issue 15, `mixshow pretrain`'s VAE),
read by tests/test_vae_fullgrad.c:

    /usr/bin/python3 tools/ref/gen_vae_fullgrad_golden.py [--diffusers /tmp/diffusers-0.19.3/src]

Model: diffusers 0.19.3 AutoencoderKL with block_out_channels (8, 16), DownEncoderBlock2D x2 /
UpDecoderBlock2D x2, layers_per_block 2, norm_num_groups 4, latent_channels 4, 3 -> 3 channels
(the C test builds the same config by hand). Weights: torch's default init, seeded, then every
1-D parameter (norm weights, biases) moved by 0.1 * N(0,1); quant_conv.bias of the LAST logvar
channel is lowered by 40 so that this channel's logvar sits below the clamp at -30 (its
gradient must stop there, as torch.clamp's does).
Step (AutoencoderKL.forward with sample_posterior, the noise given):
    post = encode(x).latent_dist; z = post.mean + post.std * eps; img = decode(z).sample
    L = sum(R * img) + KL_W * sum(post.kl())          (kl: 0.5 sum(mean^2 + var - 1 - logvar))
x (2,3,16,24) non-square, eps, R random. The reference runs in float64 (float32 weights and
inputs upcast); the same in float32 is compared with it (metadata "f32_vs_f64/...").

Keys: w/<diffusers key> (F32) weights, g/<key> (F32, rounded from F64) gradients,
in/{x, eps, R}, out/{mean, logvar (clamped), img, kl (2)} (F32 from F64), dx (input gradient).
"""
import argparse, importlib, os, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import write_safetensors, versions, stub_diffusers  # noqa: E402
from gen_fullgrad_golden import rel_l2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "vae_fullgrad_golden.safetensors")
SEED = 1516
CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=2,
           act_fn="silu", latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
N, H, W = 2, 16, 24
KL_W = 0.25
CLAMP_SHIFT = -40.0


def run(vae, x, eps, R, torch, dt):
    vae = vae.to(dt)
    vae.zero_grad(set_to_none=True)
    x = x.to(dt).clone().requires_grad_(True)
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * eps.to(dt)
    img = vae.decode(z).sample
    kl = post.kl()
    loss = (R.to(dt) * img).sum() + KL_W * kl.sum()
    loss.backward()
    grads = {k: p.grad.detach().double().numpy().copy() for k, p in vae.named_parameters()}
    outs = {"mean": post.mean, "logvar": post.logvar, "img": img, "kl": kl}
    return {k: v.detach().double().numpy() for k, v in outs.items()}, grads, x.grad.detach().double().numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    a = ap.parse_args()
    import torch
    stub_diffusers(a.diffusers, ['models'])
    AutoencoderKL = importlib.import_module("diffusers.models.autoencoder_kl").AutoencoderKL
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    vae = AutoencoderKL(**CFG)
    lat = CFG["latent_channels"]
    with torch.no_grad():
        for _, p in vae.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        vae.quant_conv.bias[2 * lat - 1] += CLAMP_SHIFT
    w = {k: v.detach().float().numpy().copy() for k, v in vae.state_dict().items()}
    x = torch.randn((N, 3, H, W), generator=gen)
    eps = torch.randn((N, lat, H // 2, W // 2), generator=gen)
    R = torch.randn((N, 3, H, W), generator=gen)

    o64, g64, dx64 = run(vae, x, eps, R, torch, torch.float64)
    o32, g32, dx32 = run(vae, x, eps, R, torch, torch.float32)
    assert (o64["logvar"][:, lat - 1] == -30.0).all(), "the clamped channel is not clamped"
    assert (o64["logvar"][:, :lat - 1] > -30.0).all()
    # to_k.bias moves every logit of a query by the same q.b: the softmax cancels it (gradient 0
    # in exact arithmetic; float32 gives rounding noise), so it is left out of the worst
    worst = max((k for k in g64 if not k.endswith("to_k.bias")), key=lambda k: rel_l2(g32[k], g64[k]))
    meta = dict(versions(), diffusers="0.19.3 (source)", seed=str(SEED), kl_weight=repr(KL_W),
                loss="sum(R * decode(mean + std * eps)) + kl_weight * sum(kl), float64 reference",
                clamp="quant_conv.bias[%d] += %g: logvar channel %d clamped at -30" % (2 * lat - 1, CLAMP_SHIFT, lat - 1))
    meta["f32_vs_f64/img"] = "%.2e" % rel_l2(o32["img"], o64["img"])
    meta["f32_vs_f64/worst_grad"] = "%.2e (%s)" % (rel_l2(g32[worst], g64[worst]), worst)
    tensors = {}
    for k, v in w.items():
        tensors["w/" + k] = v
    for k, v in g64.items():
        tensors["g/" + k] = v.astype(np.float32)
    tensors.update({"in/x": x.numpy(), "in/eps": eps.numpy(), "in/R": R.numpy(), "dx": dx64.astype(np.float32)})
    for k, v in o64.items():
        tensors["out/" + k] = v.astype(np.float32)
    print("vae: %d parameter tensors, %d values; float32 vs float64: img %s, worst gradient %s" % (
        len(g64), sum(v.size for v in g64.values()), meta["f32_vs_f64/img"], meta["f32_vs_f64/worst_grad"]))
    n = write_safetensors(OUT, tensors, meta)
    print("wrote %s (%d bytes)" % (OUT, n))


if __name__ == "__main__":
    main()
