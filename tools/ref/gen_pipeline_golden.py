#!/usr/bin/python3
"""Golden tensors for the text-to-image pipeline (mixshow.c ms_txt2img, `mixshow sample`,
`mixshow dump`), read by tests/test_pipeline.c. Writes tests/data/pipeline_golden.safetensors.

    ATEN_CPU_CAPABILITY is forced to avx2 (the torch.randn kernel of stock x86-64 torch, what
    MS_TORCH_CPU_AVX2 mirrors) before torch is imported.
    /usr/bin/python3 tools/ref/gen_pipeline_golden.py [--diffusers /tmp/diffusers-0.19.3/src]
        [--transformers /tmp/clip_hf/src] [--model /work/shared/models/tiny-sd]

The networks are the real diffusers 0.19.3 modules (UNet2DConditionModel, AutoencoderKL,
T2IAdapter, DPMSolverMultistepScheduler, DDIMScheduler; imported with stubbed hub packages by
gen_unet_golden.import_unet) and HF transformers' CLIPTokenizer + CLIPTextModel (imported by
gen_clip_golden.import_transformers; see there for the source commit). The sampling loop below
is StableDiffusionPipeline.__call__ / StableDiffusionAdapterPipeline.__call__ of diffusers
0.19.3 transcribed statement by statement (the pipeline classes themselves need the hub,
accelerate and the safety checker); the comments give the line numbers of
pipelines/stable_diffusion/pipeline_stable_diffusion.py.

Keys (runs r in dpm, ddim, adapter):
  <r>/latents     (steps, B, 4, h, w) latents after each scheduler step (F32)
  <r>/image       (B, 3, H, W) vae.decode(latents / scaling_factor) (F32, not clamped)
  <r>/u8          (B, H, W, 3) numpy_to_pil's uint8 pixels
  <r>/cond        adapter run only: (1, 1, H, W) condition given to the adapter
  resize/<name>/in, resize/<name>/out  uint8 images, PIL Image.resize(LANCZOS)
  dump/in.*       an inputs file for `mixshow dump`;  dump/<output name>: torch's outputs
Run parameters (prompt, negative, seed, steps, cfg, size) are in the metadata as JSON.
"""
import argparse, importlib, json, os, sys, types

os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import read_safetensors, versions, write_safetensors   # noqa: E402

RUNS = [
    # name, sampler, steps, W, H, batch, prompt, negative, cfg, seed, adapter_scale
    ("dpm", "dpm", 10, 64, 48, 1, "a photo of a cat", "blurry, low quality", 7.5, 42, None),
    ("ddim", "ddim", 10, 64, 48, 2, "a watercolor painting of a lighthouse", None, 5.0, 1234, None),
    ("adapter", "dpm", 6, 64, 64, 1, "a sketch of a house", None, 7.5, 7, 0.8),
]
RESIZE = [("L_96x80_to_64x48", 1, 96, 80, 64, 48), ("RGB_40x30_to_64x48", 3, 40, 30, 64, 48),
          ("RGB_200x150_to_64x64", 3, 200, 150, 64, 64), ("L_64x48_to_64x96", 1, 64, 48, 64, 96)]


def import_all(dsrc, tsrc):
    from gen_unet_golden import import_unet
    UNet, _ = import_unet(dsrc)                      # registers diffusers, diffusers.models, stubs
    m = types.ModuleType("diffusers.schedulers"); m.__path__ = [os.path.join(dsrc, "diffusers", "schedulers")]
    sys.modules["diffusers.schedulers"] = m
    dpm = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_multistep").DPMSolverMultistepScheduler
    ddim = importlib.import_module("diffusers.schedulers.scheduling_ddim").DDIMScheduler
    vae = importlib.import_module("diffusers.models.autoencoder_kl").AutoencoderKL
    ad = importlib.import_module("diffusers.models.adapter").T2IAdapter
    from gen_clip_golden import import_transformers
    tc, mc, cc = import_transformers(tsrc)
    return UNet, vae, ad, {"dpm": dpm, "ddim": ddim}, tc, mc, cc


def build(cls, folder, weights="diffusion_pytorch_model.safetensors"):
    import torch
    cfg = json.load(open(os.path.join(folder, "config.json")))
    model = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sd, _ = read_safetensors(os.path.join(folder, weights))
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}, strict=True)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--transformers", default="/tmp/clip_hf/src")
    ap.add_argument("--model", default="/work/shared/models/tiny-sd")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "tests", "data", "pipeline_golden.safetensors"))
    a = ap.parse_args()
    import torch
    import PIL
    from PIL import Image
    torch.set_num_threads(1)
    UNet, AutoencoderKL, T2IAdapter, scheds, tc, mc, cc = import_all(a.diffusers, a.transformers)
    unet = build(UNet, os.path.join(a.model, "unet"))
    vae = build(AutoencoderKL, os.path.join(a.model, "vae"))
    sketch = build(T2IAdapter, os.path.join(a.model, "t2iadapter_sketch"))
    tok = tc.CLIPTokenizer(os.path.join(a.model, "tokenizer", "vocab.json"), os.path.join(a.model, "tokenizer", "merges.txt"))
    tcfg = cc.CLIPTextConfig(**{k: v for k, v in json.load(open(os.path.join(a.model, "text_encoder", "config.json"))).items()
                                if not k.startswith("_") and k not in ("architectures", "torch_dtype", "transformers_version")})
    te = mc.CLIPTextModel(tcfg)
    sd, _ = read_safetensors(os.path.join(a.model, "text_encoder", "model.safetensors"))
    missing, unexpected = te.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()},
                                             strict=False)
    assert not missing and all(k.endswith("position_ids") for k in unexpected), (missing, unexpected)
    te.eval()
    sched_cfg = json.load(open(os.path.join(a.model, "scheduler", "scheduler_config.json")))
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode(texts):                                   # _encode_prompt :291-346
        ids = tok(texts, padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids, attention_mask=None)[0], ids

    T, meta_runs = {}, []
    with torch.no_grad():
        for name, kind, steps, W, H, B, prompt, negative, cfg, seed, ascale in RUNS:
            sched = scheds[kind].from_config(sched_cfg)
            do_cfg = cfg > 1.0                                                 # :624
            pe, _ = encode([prompt])
            pe = pe.repeat(1, B, 1).view(B, pe.shape[1], -1)                   # :354-356
            if do_cfg:
                ne, _ = encode([negative if negative is not None else ""])      # :358-393
                ne = ne.repeat(1, B, 1).view(B, ne.shape[1], -1)
                pe = torch.cat([ne, pe])                                       # :408
            sched.set_timesteps(steps)                                         # :642
            g = torch.Generator().manual_seed(seed)
            latents = torch.randn((B, unet.config.in_channels, H // vae_scale_factor, W // vae_scale_factor),
                                  generator=g, dtype=torch.float32)            # prepare_latents :498-513
            latents = latents * sched.init_noise_sigma
            extra = {"generator": g} if kind == "ddpm" or kind == "euler" else {}
            if kind == "ddim":
                extra = {"eta": 0.0, "generator": g}
            state = None
            if ascale is not None:                                             # adapter pipeline :706-714
                gc = torch.Generator().manual_seed(seed + 1)
                cond = torch.rand((1, 1, H, W), generator=gc)
                T[name + "/cond"] = cond.numpy()
                state = [v * ascale for v in sketch(cond)]
                if B > 1:
                    state = [v.repeat(B, 1, 1, 1) for v in state]
                if do_cfg:
                    state = [torch.cat([v] * 2, dim=0) for v in state]
            traj = []
            for i, t in enumerate(sched.timesteps):                            # :664-694
                lmi = torch.cat([latents] * 2) if do_cfg else latents
                lmi = sched.scale_model_input(lmi, t)
                kw = {} if state is None else {"down_block_additional_residuals": [s.clone() for s in state]}
                noise_pred = unet(lmi, t, encoder_hidden_states=pe, **kw).sample
                if do_cfg:
                    u, c = noise_pred.chunk(2)
                    noise_pred = u + cfg * (c - u)
                latents = sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]
                traj.append(latents.clone())
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]   # :697
            im = (image / 2 + 0.5).clamp(0, 1)                                 # VaeImageProcessor.denormalize
            im = im.cpu().permute(0, 2, 3, 1).float().numpy()                  # pt_to_numpy
            u8 = (im * 255).round().astype("uint8")                            # numpy_to_pil
            T[name + "/latents"] = torch.stack(traj).numpy()
            T[name + "/image"] = image.numpy()
            T[name + "/u8"] = u8
            meta_runs.append(dict(name=name, sampler=kind, steps=steps, width=W, height=H, batch=B, prompt=prompt,
                                  negative=negative, cfg=cfg, seed=seed, adapter_scale=ascale,
                                  timesteps=[float(x) for x in sched.timesteps]))

        # ---- PIL Lanczos resize (diffusers _preprocess_adapter_image) ----
        rng = np.random.RandomState(5)
        for rname, C, w, h, ow, oh in RESIZE:
            x = rng.randint(0, 256, size=(h, w, C) if C > 1 else (h, w)).astype(np.uint8)
            # smooth areas and hard edges both: half the image a gradient
            x[: h // 2] = (np.arange(w, dtype=np.int64)[None, :] * 255 // max(w - 1, 1)).astype(np.uint8).reshape(
                (1, w) + ((1,) if C > 1 else ()))
            img = Image.fromarray(x, mode="L" if C == 1 else "RGB")
            y = np.array(img.resize((ow, oh), resample=Image.LANCZOS))
            T["resize/%s/in" % rname] = x.reshape(h, w, C)
            T["resize/%s/out" % rname] = y.reshape(oh, ow, C)

        # ---- mixshow dump: inputs and torch's outputs ----
        g = torch.Generator().manual_seed(99)
        B, h, w = 2, 8, 16
        D = unet.config.cross_attention_dim
        ins = {
            "in.latent": torch.randn((B, 4, h, w), generator=g),
            "in.timestep": torch.tensor([981, 37], dtype=torch.int64),
            "in.context": torch.randn((B, 77, D), generator=g),
            "in.cond_sketch": torch.rand((1, 1, h * 8, w * 8), generator=g),
            "in.adapter_scale": torch.tensor(0.7),
            "in.image": torch.rand((B, 3, 32, 48), generator=g) * 2 - 1,
            "in.vae_noise": torch.randn((B, 4, 4, 6), generator=g),
            "in.dec_latent": torch.randn((1, 4, 5, 7), generator=g),
        }
        ins["in.input_ids"] = tok(["a photo of a cat", "two dogs on a red sofa"], padding="max_length",
                                  max_length=77, truncation=True, return_tensors="pt").input_ids.to(torch.int64)
        outs = {}
        outs["unet.eps"] = unet(ins["in.latent"], ins["in.timestep"], encoder_hidden_states=ins["in.context"]).sample
        feats = sketch(ins["in.cond_sketch"])
        for i, f in enumerate(feats):
            outs["adapter.sketch.feat%d" % i] = f
        res = [(f * ins["in.adapter_scale"].item()).repeat(B, 1, 1, 1) for f in feats]
        outs["unet_adapter.eps"] = unet(ins["in.latent"], ins["in.timestep"], encoder_hidden_states=ins["in.context"],
                                        down_block_additional_residuals=res).sample
        post = vae.encode(ins["in.image"]).latent_dist
        outs["vae.enc.mean"], outs["vae.enc.logvar"], outs["vae.enc.std"] = post.mean, post.logvar, post.std
        outs["vae.enc.sample"] = post.mean + post.std * ins["in.vae_noise"]
        outs["vae.enc.latent"] = outs["vae.enc.sample"] * vae.config.scaling_factor
        outs["vae.dec.image"] = vae.decode(ins["in.dec_latent"] / vae.config.scaling_factor).sample
        outs["text.hidden"] = te(ins["in.input_ids"])[0]
        for k, v in ins.items():
            T["dump/" + k] = v.numpy()
        for k, v in outs.items():
            T["dump/" + k] = v.numpy()

    meta = dict(versions(), diffusers="0.19.3", transformers="4.31.0 (see gen_clip_golden.py)", pillow=PIL.__version__,
                aten_cpu_capability=os.environ["ATEN_CPU_CAPABILITY"], model="tiny-sd",
                runs=json.dumps(meta_runs), resize_seed="5", dump_seed="99",
                note="adapter run: cond = torch.rand((1,1,H,W), Generator seed+1), sketch adapter, no resize")
    n = write_safetensors(a.out, T, meta)
    print(os.path.basename(a.out), n, "bytes")


if __name__ == "__main__":
    main()
