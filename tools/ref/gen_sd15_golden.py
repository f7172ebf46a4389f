#!/usr/bin/python3
"""Golden tensors for tests/test_sd15.c (`make test-full`): the three SD 1.5 networks at their
real sizes (UNet 860M, VAE 84M, CLIP text 123M parameters) with random weights, small inputs.

Writes tests/data/sd15_golden.safetensors. Run with Debian's python3-torch (torch 1.13) and numpy:

    /usr/bin/python3 tools/ref/gen_sd15_golden.py [--diffusers /tmp/diffusers-0.19.3/src]
        [--transformers /tmp/clip_hf/src] [--configs /work/shared/models/sd15-configs]

Takes ~7.5 GB of memory (the UNet in float64) and ~10 minutes (Debian's torch uses a reference
BLAS; --only unet,vae,text recomputes a subset and keeps the rest of --out). Modules are
imported, not copied, through the importers of gen_unet_golden.py (diffusers
UNet2DConditionModel; baddbmm(empty) is fed zeros, for the VAE's attention too), gen_vae_golden.py
(AutoencoderKL) and gen_clip_golden.py (HF CLIPTextModel, transformers 4.31).

The weights are not stored (4.3 GB): both sides make them from torch's CPU generator. For each
network, g = torch.Generator().manual_seed(SEED[net]); then for every parameter in the order
of sd15-configs/diffusers-keys.txt (position_ids skipped), which is diffusers' state_dict() order
and the order of mixshow's tables (tests/test_weights.c checks that) -- except that transformers'
CLIPAttention defines k_proj, v_proj, q_proj, out_proj in that order, so its state_dict() lists
k, v, q, out where the file and mixshow list q, k, v, out (the set of keys is asserted equal):
    x = torch.randn(shape, generator=g)                      (float32, torch's AVX2 kernel)
    1-D ".weight" (GroupNorm / LayerNorm gamma):  x * 0.1f + 1.0f
    1-D (biases):                                 x * 0.05f
    otherwise:                                    x * float32(1 / sqrt(numel / shape[0]))
every product and sum a float32 operation (numpy float32 here, C floats in the test); then the
inputs from the same generator:
    unet: latent = randn(2,4,16,16), ctx = randn(2,77,768), R = randn(2,4,16,16) (loss
          weights); timesteps 999 and 423.5 (fixed); then LoRA rank 4 on to_q/k/v/out.0 of all
          32 attentions in mixshow's UNetLora order (module by module, q k v out, down then up):
          down (4,in) = randn * f32(1/sqrt(in)), up (out,4) = randn * f32(1/2)  (alpha 1)
    vae:  latents = randn(1,4,16,16) (scaled latents: decode(latents / 0.18215)),
          image = randn(1,3,128,128) (encode)
    text: ids = randint(0, 49406, (2,77)), then BOS at 0, sample 0 ends with EOS at 12 and EOS
          padding, sample 1 with EOS at 76 (ids are stored)
so that the test can check it made the same numbers: "gen/<net>" holds 4 values of every
generated tensor (at 0, n/3, 2n/3, n-1; parameters in order, then the inputs), bit for bit.

Each network runs in torch float32 and then, the same module converted with .double(), in
float64. Stored (all F32): "<net>/..." the float64 results rounded to float32 (the references),
"f32/<net>/..." torch float32 results where small; metadata "f32_vs_f64/<key>" gives the
relative L2 distance of torch float32 from float64 for every reference.
Keys:
  unet/eps (2,4,16,16)  unet/act/down<i>, unet/act/mid, unet/act/up0  (block outputs)
  unet/eps_lora         with the LoRA;  L = sum(R * eps_lora):
  unet/grad/ctx (2,77,768) dL/dctx;  unet/grad/lora_norm, unet/grad/lora_dot (256): per LoRA
                        tensor (UNetLora order, down then up) |dL/dW| and sum(dL/dW * W) in float64
  f32/unet/eps, f32/unet/eps_lora
  vae/decoded (1,3,128,128)  vae/mean, vae/logvar (1,4,16,16)  f32/vae/mean, f32/vae/logvar
  text/ids (2,77) I32  text/out (2,77,768) last_hidden_state
  gen/unet, gen/vae, gen/text
"""
import argparse, math, os, re, sys, time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import read_safetensors, versions, write_safetensors  # noqa: E402

SEED = {"unet": 1501, "vae": 1502, "text": 1503}
UNET_N, UNET_H, UNET_W, UNET_TK = 2, 16, 16, 77
TIMESTEPS = [999.0, 423.5]
UNET_LORA_RANK, UNET_LORA_ALPHA = 4, 1.0
VAE_H, VAE_W = 16, 16                     # latent; image 128 x 128


def rel(a, b):
    a = np.asarray(a, np.float64); b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def sample4(v):
    v = v.reshape(-1); n = v.size
    return [v[0], v[n // 3], v[2 * n // 3], v[n - 1]]


def diffusers_keys(configs, component):
    out = []
    for line in open(os.path.join(configs, "diffusers-keys.txt")):
        c, k, _ = line.rstrip("\n").split("\t")
        if c == component and not k.endswith("position_ids"):
            out.append(k)
    return out


def fill(torch, model, seed, keys):
    """Sets every parameter as the docstring says; returns (generator, list of check values)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict(keep_vars=True)
    names = [k for k in sd if not k.endswith("position_ids")]
    assert sorted(names) == sorted(keys), "state_dict keys differ from diffusers-keys.txt"
    names = keys   # (HF CLIPAttention's state_dict() has k, v, q, out_proj; the file q, k, v, out)
    checks = []
    with torch.no_grad():
        for name in names:
            p = sd[name]
            x = torch.randn(tuple(p.shape), generator=g).numpy()
            if x.ndim == 1 and name.endswith(".weight"):
                x *= np.float32(0.1); x += np.float32(1.0)
            elif x.ndim == 1:
                x *= np.float32(0.05)
            else:
                x *= np.float32(1.0 / math.sqrt(x.size // x.shape[0]))
            assert x.dtype == np.float32
            p.copy_(torch.from_numpy(x))
            checks += sample4(x)
    return g, checks


def randn(torch, g, shape, checks):
    x = torch.randn(shape, generator=g)
    checks += sample4(x.numpy())
    return x


def gen_unet(torch, args, T, meta):
    from gen_unet_golden import import_unet, attention_module_names
    import json
    UNet, _ = import_unet(args.diffusers)
    cfg = json.load(open(os.path.join(args.configs, "unet", "config.json")))
    u = UNet(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    t0 = time.time()
    g, checks = fill(torch, u, SEED["unet"], diffusers_keys(args.configs, "unet"))
    latent = randn(torch, g, (UNET_N, 4, UNET_H, UNET_W), checks)
    ctx = randn(torch, g, (UNET_N, UNET_TK, cfg["cross_attention_dim"]), checks)
    R = randn(torch, g, (UNET_N, 4, UNET_H, UNET_W), checks)
    t = torch.tensor(TIMESTEPS, dtype=torch.float32)
    for p in u.parameters():
        p.requires_grad_(False)

    # LoRA (Mix-of-Show LoRALinearLayer, y = W x (+ b) + alpha up(down(x))) on to_q, to_k, to_v,
    # to_out.0 of every attention, in mixshow's UNetLora order (attention modules forward, attn1
    # before attn2; per module q, k, v, out; down before up), drawn after the inputs:
    #   down (r, in) = randn * f32(1/sqrt(in)),  up (out, r) = randn * f32(1/sqrt(r))
    class LoRALinear(torch.nn.Module):
        def __init__(self, base, down, up):
            super().__init__()
            self.base, self.down, self.up, self.on = base, down, up, False

        def forward(self, x):
            y = self.base(x)
            if self.on:
                y = y + UNET_LORA_ALPHA * torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up)
            return y
    lora = []
    with torch.no_grad():
        for name, m in attention_module_names(u):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                base = m.to_out[0] if proj == "to_out.0" else getattr(m, proj)
                d = torch.randn((UNET_LORA_RANK, base.in_features), generator=g)
                d.numpy()[...] *= np.float32(1.0 / math.sqrt(base.in_features))
                up = torch.randn((base.out_features, UNET_LORA_RANK), generator=g)
                up.numpy()[...] *= np.float32(1.0 / math.sqrt(UNET_LORA_RANK))
                checks += sample4(d.numpy()) + sample4(up.numpy())
                mod = LoRALinear(base, torch.nn.Parameter(d), torch.nn.Parameter(up))
                if proj == "to_out.0":
                    m.to_out[0] = mod
                else:
                    setattr(m, proj, mod)
                lora.append(mod)
    print("unet: %d tensors generated in %.0f s" % (len(checks) // 4, time.time() - t0), flush=True)

    def run(dt):
        rec = {}
        hooks = [b.register_forward_hook(lambda m, i_, o, i=i: rec.__setitem__("act/down%d" % i, o[0]))
                 for i, b in enumerate(u.down_blocks)]
        hooks.append(u.mid_block.register_forward_hook(lambda m, i_, o: rec.__setitem__("act/mid", o)))
        hooks.append(u.up_blocks[0].register_forward_hook(lambda m, i_, o: rec.__setitem__("act/up0", o)))
        tt = t.to(dt) if dt == torch.float64 else t
        t1 = time.time()
        with torch.no_grad():
            rec["eps"] = u(latent.to(dt), tt, ctx.to(dt)).sample
        for h in hooks:
            h.remove()
        t2 = time.time()
        # with LoRA: L = sum(R * eps), gradients for the context and every LoRA tensor
        for m in lora:
            m.on = True
            m.down.grad = m.up.grad = None
        c = ctx.to(dt).clone().requires_grad_(True)
        e = u(latent.to(dt), tt, c).sample
        (R.to(dt) * e).sum().backward()
        rec["eps_lora"] = e.detach()
        rec["grad/ctx"] = c.grad
        gs = [x.grad for m in lora for x in (m.down, m.up)]
        ws = [x.detach() for m in lora for x in (m.down, m.up)]
        rec["grad/lora_norm"] = torch.stack([gg.double().norm() for gg in gs])
        rec["grad/lora_dot"] = torch.stack([(gg.double() * w.double()).sum() for gg, w in zip(gs, ws)])
        for m in lora:
            m.on = False
            m.down.grad = m.up.grad = None
        print("unet %s forward: %.0f s, with LoRA forward + backward %.0f s" % (dt, t2 - t1, time.time() - t2), flush=True)
        return {k: v.detach().numpy().copy() for k, v in rec.items()}
    r32 = run(torch.float32)
    u.double()
    r64 = run(torch.float64)
    for k, v in r64.items():
        T["unet/" + k] = v.astype(np.float32)
        meta["f32_vs_f64/unet/" + k] = "%.3e" % rel(r32[k], v)
    T["f32/unet/eps"] = r32["eps"]
    T["f32/unet/eps_lora"] = r32["eps_lora"]
    T["gen/unet"] = np.array(checks, np.float32)
    meta["unet_lora"] = "rank %d alpha %r" % (UNET_LORA_RANK, UNET_LORA_ALPHA)
    del u


def gen_vae(torch, args, T, meta):
    from gen_vae_golden import import_diffusers
    import json
    AutoencoderKL, _ = import_diffusers(args.diffusers)
    import diffusers.models.attention_processor as ap   # the same baddbmm(empty) guard as the UNet

    class ZeroEmpty:
        def __getattr__(self, name): return getattr(torch, name)
        @staticmethod
        def empty(*a, **k): return torch.zeros(*a, **k)
    ap.torch = ZeroEmpty()
    cfg = json.load(open(os.path.join(args.configs, "vae", "config.json")))
    vae = AutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    g, checks = fill(torch, vae, SEED["vae"], diffusers_keys(args.configs, "vae"))
    lat = randn(torch, g, (1, 4, VAE_H, VAE_W), checks)
    img = randn(torch, g, (1, 3, 8 * VAE_H, 8 * VAE_W), checks)
    sf = cfg["scaling_factor"]

    def run(dt):
        t1 = time.time()
        with torch.no_grad():
            post = vae.encode(img.to(dt)).latent_dist
            out = {"decoded": vae.decode(lat.to(dt) / sf).sample, "mean": post.mean, "logvar": post.logvar}
        print("vae %s decode + encode: %.0f s" % (dt, time.time() - t1), flush=True)
        return {k: v.numpy().copy() for k, v in out.items()}
    r32 = run(torch.float32)
    vae.double()
    r64 = run(torch.float64)
    for k, v in r64.items():
        T["vae/" + k] = v.astype(np.float32)
        meta["f32_vs_f64/vae/" + k] = "%.3e" % rel(r32[k], v)
    T["f32/vae/mean"], T["f32/vae/logvar"] = r32["mean"], r32["logvar"]
    T["gen/vae"] = np.array(checks, np.float32)
    del vae


def gen_text(torch, args, T, meta):
    from gen_clip_golden import import_transformers
    import json
    _, mc, cc = import_transformers(args.transformers)
    cfg = json.load(open(os.path.join(args.configs, "text_encoder", "config.json")))
    model = mc.CLIPTextModel(cc.CLIPTextConfig(**cfg)).eval()
    g, checks = fill(torch, model, SEED["text"], diffusers_keys(args.configs, "text_encoder"))
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0] = 49406
    ids[0, 12:] = 49407
    ids[1, 76] = 49407

    def run(dt):
        t1 = time.time()
        # transformers 4.31's _make_causal_mask calls torch.full(.., finfo(dtype).min) without a
        # dtype, which overflows float32 when dtype is float64: make float64 the default then
        torch.set_default_dtype(dt)
        with torch.no_grad():
            out = model(input_ids=ids).last_hidden_state
        torch.set_default_dtype(torch.float32)
        print("text %s forward: %.0f s" % (dt, time.time() - t1), flush=True)
        return out.numpy().copy()
    r32 = run(torch.float32)
    model.double()
    r64 = run(torch.float64)
    T["text/ids"] = ids.numpy().astype(np.int32)
    T["text/out"] = r64.astype(np.float32)
    meta["f32_vs_f64/text/out"] = "%.3e" % rel(r32, r64)
    T["gen/text"] = np.array(checks, np.float32)
    del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--transformers", default="/tmp/clip_hf/src")
    ap.add_argument("--configs", default="/work/shared/models/sd15-configs")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "tests", "data", "sd15_golden.safetensors"))
    ap.add_argument("--only", default="", help="comma-separated subset of vae,unet,text to recompute")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    m = re.search(r"CPU capability usage: (\w+)", torch.__config__.show())
    cap = m.group(1) if m else "?"
    assert cap in ("AVX2", "AVX512"), "torch.randn must run its AVX2 kernel (found %s)" % cap
    T, meta = {}, dict(versions(), diffusers="0.19.3", transformers="4.31.0", torch_cpu_capability=cap,
                       seeds="unet %d, vae %d, text %d" % (SEED["unet"], SEED["vae"], SEED["text"]),
                       timesteps=str(TIMESTEPS),
                       weights="randn * 0.1f + 1 (1-D .weight), randn * 0.05f (1-D), randn * f32(1/sqrt(fan_in))")
    # diffusers first: its import_utils calls find_spec("transformers"), which fails once the
    # transformers package is a stub module. --only: redo some networks, keep the rest of --out.
    nets = args.only.split(",") if args.only else ["vae", "unet", "text"]
    if args.only:
        old, old_meta = read_safetensors(args.out)
        net_of = lambda k: k.split("/")[1] if k.split("/")[0] in ("f32", "gen", "f32_vs_f64") else k.split("/")[0]
        T.update({k: v for k, v in old.items() if net_of(k) not in nets})
        meta.update({k: v for k, v in old_meta.items() if k not in meta and net_of(k) not in nets
                     and not (k == "unet_lora" and "unet" in nets)})
    for net in ("vae", "unet", "text"):
        if net in nets:
            {"vae": gen_vae, "unet": gen_unet, "text": gen_text}[net](torch, args, T, meta)
    for k, v in T.items():
        assert np.isfinite(np.asarray(v, np.float64)).all(), "non-finite values in " + k
    size = write_safetensors(args.out, T, meta)
    print("wrote %s (%d tensors, %.2f MB)" % (args.out, len(T), size / 1e6))
    for k in sorted(meta):
        if k.startswith("f32_vs"):
            print("  %-32s %s" % (k, meta[k]))


if __name__ == "__main__":
    main()
