#!/usr/bin/python3
"""Golden tensors for models/vae.c and models/adapter.c: diffusers 0.19.3 AutoencoderKL and
T2IAdapter (full_adapter) on the tiny random-weight model.

Writes tests/data/vae_golden.safetensors and tests/data/adapter_golden.safetensors (read by
tests/test_vae.c). Run with Debian's python3-torch (torch 1.13) and numpy:

    /usr/bin/python3 tools/ref/gen_vae_golden.py [--diffusers /tmp/diffusers-0.19.3/src]
                                                 [--model /work/shared/models/tiny-sd]

diffusers' package __init__ needs huggingface_hub, requests, tqdm, packaging; they are stubbed
and only diffusers.models.autoencoder_kl / adapter are imported (nothing is vendored here).
Every result is computed twice: in float32 (the golden) and in float64 ("f64/..." keys), so the
test can tell how close float32 arithmetic can get. Inputs are drawn from seeded torch
generators (seeds in the metadata).
"""
import argparse, importlib, json, os, re, sys, tempfile, types
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import read_safetensors, versions, write_safetensors, stub_diffusers  # noqa: E402

SEED = 20230519
IMG_B, IMG_H, IMG_W = 2, 48, 64          # non-square, B = 2
TILE_LAT_H, TILE_LAT_W = 14, 20          # tiled decode: latent larger than one 8x8 tile
TILE_IMG_H, TILE_IMG_W = 112, 160        # tiled encode: image larger than one 64x64 tile
SKETCH = (1, 1, 128, 192)
OPENPOSE = (2, 3, 64, 128)


def import_diffusers(src):
    stub_diffusers(src, ['models'])
    ak = importlib.import_module("diffusers.models.autoencoder_kl")
    ad = importlib.import_module("diffusers.models.adapter")
    return ak.AutoencoderKL, ad.T2IAdapter


def build(cls, folder):
    import torch
    cfg = json.load(open(os.path.join(folder, "config.json")))
    model = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sd, _ = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected
    return model.eval()


def vae_outputs(vae, x, noise, lat, tile_lat, tile_img, dt):
    import torch
    vae = vae.to(dt)
    x, noise, lat, tile_lat, tile_img = (t.to(dt) for t in (x, noise, lat, tile_lat, tile_img))
    sf = vae.config.scaling_factor
    out = {}
    with torch.no_grad():
        vae.disable_tiling()
        post = vae.encode(x).latent_dist
        out["mean"], out["logvar"], out["std"] = post.mean, post.logvar, post.std
        smp = post.mean + post.std * noise            # DiagonalGaussianDistribution.sample with this noise
        out["sample"] = smp
        out["latents"] = smp * sf
        out["decoded"] = vae.decode(lat / sf).sample
        vae.enable_tiling()
        out["tiled_decoded"] = vae.decode(tile_lat / sf).sample
        tp = vae.encode(tile_img).latent_dist
        out["tiled_mean"], out["tiled_logvar"] = tp.mean, tp.logvar
        vae.disable_tiling()
    return {k: v.float() if dt == torch.float32 else v for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--model", default="/work/shared/models/tiny-sd")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data"))
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    AutoencoderKL, T2IAdapter = import_diffusers(a.diffusers)

    vae = build(AutoencoderKL, os.path.join(a.model, "vae"))
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(IMG_B, 3, IMG_H, IMG_W, generator=g) * 2 - 1          # images in [-1, 1]
    noise = torch.randn(IMG_B, 4, IMG_H // 8, IMG_W // 8, generator=g)
    lat = torch.randn(IMG_B, 4, IMG_H // 8, IMG_W // 8, generator=g) * 0.8   # latents (scaled)
    tile_lat = torch.randn(1, 4, TILE_LAT_H, TILE_LAT_W, generator=g) * 0.8
    tile_img = torch.rand(1, 3, TILE_IMG_H, TILE_IMG_W, generator=g) * 2 - 1
    o32 = vae_outputs(vae, x, noise, lat, tile_lat, tile_img, torch.float32)
    o64 = vae_outputs(vae, x, noise, lat, tile_lat, tile_img, torch.float64)
    t = {"in/image": x, "in/noise": noise, "in/latents": lat, "in/tile_latents": tile_lat, "in/tile_image": tile_img}
    t.update({"out/" + k: v for k, v in o32.items()})
    t.update({"f64/" + k: v for k, v in o64.items()})
    meta = dict(versions(), diffusers="0.19.3", model="tiny-sd/vae", seed=str(SEED),
                note="image U(-1,1), noise N(0,1), latents 0.8 N(0,1), drawn in that order from one "
                     "torch.Generator; tiling: tile_sample_min_size = sample_size = 64 (latent 8)")
    n = write_safetensors(os.path.join(a.out, "vae_golden.safetensors"), t, meta)
    print("vae_golden.safetensors", n, "bytes")

    t = {}
    g = torch.Generator().manual_seed(SEED + 1)
    for name, shape in [("sketch", SKETCH), ("openpose", OPENPOSE)]:
        ad = build(T2IAdapter, os.path.join(a.model, "t2iadapter_" + name))
        cond = torch.rand(*shape, generator=g)                              # conditions in [0, 1]
        t["in/" + name] = cond
        with torch.no_grad():
            for i, f in enumerate(ad(cond)):
                t["out/%s/%d" % (name, i)] = f
            for i, f in enumerate(ad.double()(cond.double())):
                t["f64/%s/%d" % (name, i)] = f
    meta = dict(versions(), diffusers="0.19.3", model="tiny-sd/t2iadapter_{sketch,openpose}", seed=str(SEED + 1),
                note="conditions U(0,1): sketch %s then openpose %s from one torch.Generator" % (SKETCH, OPENPOSE))
    n = write_safetensors(os.path.join(a.out, "adapter_golden.safetensors"), t, meta)
    print("adapter_golden.safetensors", n, "bytes")


if __name__ == "__main__":
    main()
