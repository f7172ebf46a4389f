#!/usr/bin/python3
"""Golden tensors for models/unet.c: diffusers 0.19.3 UNet2DConditionModel on tiny-sd.

Writes tests/data/unet_golden.safetensors (read by tests/test_unet.c). Run with Debian's
python3-torch (torch 1.13) and numpy:

    /usr/bin/python3 tools/ref/gen_unet_golden.py [--diffusers /tmp/diffusers-0.19.3/src]
                                                  [--model ../shared/models/tiny-sd]

diffusers' package __init__ needs huggingface_hub etc.; they are stubbed and only
diffusers.models.unet_2d_condition is imported (nothing of diffusers is vendored here).
Weights: the tiny random-weight model written by diffusers 0.19.3 (read with common.py).

Every reference value is computed in float64 (the float32 inputs and weights upcast), so the
test measures mixshow's float32 error alone; the same runs in torch float32 are compared with
float64 here and the errors stored in the metadata ("f32_vs_f64/...": what float32 reaches).

Keys (inputs F32, references F64):
  in/latent (2,4,8,12)  in/t (2) float timesteps  in/ctx (2,77,32)  in/R (2,4,8,12) loss weights
  in/layer_ctx (16,2,77,32)  per cross-attention layer, order down, mid, up (Mix-of-Show)
  in/adapter/<i> T2I-Adapter-like residuals for down block i
  lora/<module>.lora_down.weight (r,in), .lora_up.weight (out,r); meta lora_alpha, lora_rank
  eps                 plain forward                   act/down<i>, act/mid, act/up<i>: block outputs
  eps_layer           layer-wise contexts             eps_adapter: with the adapter residuals
  eps_lora            LoRA on every to_q/to_k/to_v/to_out.0 (self and cross)
  grad_lora/ctx       dL/dctx for L = sum(R * eps_lora)     grad_lora/<module>.lora_down.weight ...
  grad_layer/ctx      (16,2,77,32) dL/dlayer_ctx for L = sum(R * eps_layer)
"""
import argparse, importlib, math, os, re, sys, tempfile, types
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import read_safetensors, write_safetensors, versions, stub_diffusers  # noqa: E402

SEED = 1234
N, H, W, TK = 2, 8, 12, 77
TIMESTEPS = [999.0, 423.5]
LORA_RANK, LORA_ALPHA = 3, 0.75


def import_unet(src):
    """diffusers.models.unet_2d_condition.UNet2DConditionModel without diffusers' __init__."""
    import torch
    stub_diffusers(src, ['models'])
    mod = importlib.import_module("diffusers.models.unet_2d_condition")
    ap = importlib.import_module("diffusers.models.attention_processor")
    # Attention.get_attention_scores calls torch.baddbmm(torch.empty(..), q, k^T, beta=0): with
    # torch 1.13 on this machine some runs came out NaN (uninitialised memory reaching the
    # result). Hand it zeros instead: with beta = 0 the value is the same by definition.
    class ZeroEmpty:
        def __getattr__(self, name): return getattr(torch, name)
        @staticmethod
        def empty(*a, **k): return torch.zeros(*a, **k)
    ap.torch = ZeroEmpty()
    return mod.UNet2DConditionModel, ap.AttnProcessor


def cross_attention_modules(unet):
    """attn2 modules in Mix-of-Show's order (edlora.py revise_edlora_unet_attention_forward):
    down_blocks, then mid_block, then up_blocks, each in named_children order."""
    out = []
    for part in (unet.down_blocks, unet.mid_block, unet.up_blocks):
        for name, m in part.named_modules():
            if m.__class__.__name__ == "Attention" and name.endswith("attn2"):
                out.append(m)
    return out


def attention_module_names(unet):
    """(name, module) of every BasicTransformerBlock attention, forward order (down, mid, up),
    attn1 before attn2: the order of UNetLora in mixshow."""
    out = []
    for prefix, part in (("down_blocks", unet.down_blocks), ("mid_block", unet.mid_block), ("up_blocks", unet.up_blocks)):
        for name, m in part.named_modules():
            if m.__class__.__name__ == "Attention":
                out.append((prefix + "." + name, m))
    return out


class LayerContextProcessor:
    """AttnProcessor that feeds cross-attention layer idx its own context (Mix-of-Show's
    EDLoRA_AttnProcessor picks encoder_hidden_states[:, idx]; here a shared list)."""
    def __init__(self, base, idx, store):
        self.base, self.idx, self.store = base, idx, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return self.base(attn, hidden_states, encoder_hidden_states=self.store[self.idx],
                         attention_mask=attention_mask, temb=temb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--model", default=os.path.join(here, "..", "..", "..", "shared", "models", "tiny-sd"))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "data", "unet_golden.safetensors"))
    args = ap.parse_args()

    import json
    import torch
    torch.set_num_threads(1)
    UNet, AttnProcessor = import_unet(args.diffusers)
    cfg = json.load(open(os.path.join(args.model, "unet", "config.json")))
    weights, _ = read_safetensors(os.path.join(args.model, "unet", "diffusion_pytorch_model.safetensors"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}

    def make(dtype):
        torch.manual_seed(0)
        u = UNet(**cfg)
        sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()}
        missing, unexpected = u.load_state_dict(sd, strict=True), None
        u.eval()
        return u.to(dtype)

    # ---- inputs ----
    g = torch.Generator().manual_seed(SEED)
    latent = torch.randn((N, 4, H, W), generator=g)
    t = torch.tensor(TIMESTEPS, dtype=torch.float32)
    ctx = torch.randn((N, TK, cfg["cross_attention_dim"]), generator=g)
    R = torch.randn((N, 4, H, W), generator=g)
    u64 = make(torch.float64)
    n_cross = len(cross_attention_modules(u64))
    layer_ctx = torch.randn((n_cross, N, TK, cfg["cross_attention_dim"]), generator=g)
    # adapter residuals: one per down block, the shape of that block's output before its
    # downsampler (CrossAttnDownBlock2D) / after it (DownBlock2D; the last block has none)
    shapes, h, w = [], H, W
    for i, ch in enumerate(cfg["block_out_channels"]):
        shapes.append((N, ch, h, w))
        if i < len(cfg["block_out_channels"]) - 1:
            h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    adapter = [0.5 * torch.randn(s, generator=g) for s in shapes]
    T = {"in/latent": latent.numpy(), "in/t": t.numpy(), "in/ctx": ctx.numpy(), "in/R": R.numpy(),
         "in/layer_ctx": layer_ctx.numpy()}
    for i, a in enumerate(adapter):
        T["in/adapter/%d" % i] = a.numpy()
    meta = {"diffusers": "0.19.3", "seed": str(SEED), "model": "tiny-sd (shared/models/tiny-sd)",
            "timesteps": str(TIMESTEPS), "lora_rank": str(LORA_RANK), "lora_alpha": repr(LORA_ALPHA),
            "n_cross": str(n_cross)}
    meta.update(versions())

    def rel(a, b):
        a = np.asarray(a, np.float64); b = np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    # ---- plain forward + named block outputs ----
    def run_plain(u, dt, record=None):
        hooks = []
        if record is not None:
            for i, b in enumerate(u.down_blocks):
                hooks.append(b.register_forward_hook(lambda m, i_, o, i=i: record.__setitem__("act/down%d" % i, o[0].detach().clone())))
            hooks.append(u.mid_block.register_forward_hook(lambda m, i_, o: record.__setitem__("act/mid", o.detach().clone())))
            for i, b in enumerate(u.up_blocks):
                hooks.append(b.register_forward_hook(lambda m, i_, o, i=i: record.__setitem__("act/up%d" % i, o.detach().clone())))
        with torch.no_grad():
            e = u(latent.to(dt), t.to(dt) if dt == torch.float64 else t, ctx.to(dt)).sample
        for hk in hooks:
            hk.remove()
        return e
    rec = {}
    eps64 = run_plain(u64, torch.float64, rec)
    T["eps"] = eps64.numpy()
    for k, v in rec.items():
        T[k] = v.numpy()
    u32 = make(torch.float32)
    meta["f32_vs_f64/eps"] = "%.3e" % rel(run_plain(u32, torch.float32).numpy(), eps64.numpy())

    # ---- adapter residuals (T2I-Adapter path: down_block_additional_residuals, no mid) ----
    def run_adapter(u, dt):
        with torch.no_grad():
            return u(latent.to(dt), t.to(dt) if dt == torch.float64 else t, ctx.to(dt),
                     down_block_additional_residuals=[a.to(dt).clone() for a in adapter]).sample
    e = run_adapter(u64, torch.float64)
    T["eps_adapter"] = e.numpy()
    meta["f32_vs_f64/eps_adapter"] = "%.3e" % rel(run_adapter(u32, torch.float32).numpy(), e.numpy())

    # ---- layer-wise contexts, with gradients ----
    def run_layer(u, dt):
        store = [layer_ctx[i].to(dt).clone().requires_grad_(True) for i in range(n_cross)]
        for i, m in enumerate(cross_attention_modules(u)):
            m.set_processor(LayerContextProcessor(AttnProcessor(), i, store))
        e = u(latent.to(dt), t.to(dt) if dt == torch.float64 else t, ctx.to(dt)).sample
        (R.to(dt) * e).sum().backward()
        for m in cross_attention_modules(u):
            m.set_processor(AttnProcessor())
        return e.detach(), torch.stack([s.grad for s in store])
    e64, gl64 = run_layer(u64, torch.float64)
    e32, gl32 = run_layer(u32, torch.float32)
    T["eps_layer"] = e64.numpy()
    T["grad_layer/ctx"] = gl64.numpy()
    meta["f32_vs_f64/eps_layer"] = "%.3e" % rel(e32.numpy(), e64.numpy())
    meta["f32_vs_f64/grad_layer/ctx"] = "%.3e" % rel(gl32.numpy(), gl64.numpy())

    # ---- LoRA on every to_q/to_k/to_v/to_out.0 (y = W x + b + alpha up(down(x))) ----
    names = attention_module_names(u64)
    lora_vals = {}
    for name, m in names:
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            lin = m.to_out[0] if proj == "to_out.0" else getattr(m, proj)
            key = "%s.%s" % (name, proj)
            lora_vals[key + ".lora_down.weight"] = (0.3 * torch.randn((LORA_RANK, lin.in_features), generator=g))
            lora_vals[key + ".lora_up.weight"] = (0.3 * torch.randn((lin.out_features, LORA_RANK), generator=g))
    for k, v in lora_vals.items():
        T["lora/" + k] = v.numpy()

    class LoRALinear(torch.nn.Module):
        def __init__(self, base, down, up):
            super().__init__()
            self.base, self.down, self.up = base, down, up

        def forward(self, x):
            return self.base(x) + LORA_ALPHA * torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up)

    def with_lora(u, dt):
        params = {}
        for name, m in attention_module_names(u):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                key = "%s.%s" % (name, proj)
                d = lora_vals[key + ".lora_down.weight"].to(dt).clone().requires_grad_(True)
                up = lora_vals[key + ".lora_up.weight"].to(dt).clone().requires_grad_(True)
                params[key + ".lora_down.weight"], params[key + ".lora_up.weight"] = d, up
                if proj == "to_out.0":
                    m.to_out[0] = LoRALinear(m.to_out[0], d, up)
                else:
                    setattr(m, proj, LoRALinear(getattr(m, proj), d, up))
        return params

    def run_lora(dt):
        u = make(dt)
        params = with_lora(u, dt)
        c = ctx.to(dt).clone().requires_grad_(True)
        e = u(latent.to(dt), t.to(dt) if dt == torch.float64 else t, c).sample
        (R.to(dt) * e).sum().backward()
        return e.detach(), c.grad, {k: v.grad for k, v in params.items()}
    e64, gc64, gp64 = run_lora(torch.float64)
    e32, gc32, gp32 = run_lora(torch.float32)
    T["eps_lora"] = e64.numpy()
    T["grad_lora/ctx"] = gc64.numpy()
    for k, v in gp64.items():
        T["grad_lora/" + k] = v.numpy()
    meta["f32_vs_f64/eps_lora"] = "%.3e" % rel(e32.numpy(), e64.numpy())
    meta["f32_vs_f64/grad_lora/ctx"] = "%.3e" % rel(gc32.numpy(), gc64.numpy())
    cat = lambda d: np.concatenate([d[k].numpy().ravel() for k in sorted(d)])
    meta["f32_vs_f64/grad_lora/params"] = "%.3e" % rel(cat(gp32), cat(gp64))

    # the LoRA run equals the merged model W' = W + alpha up @ down (float64)
    um = make(torch.float64)
    with torch.no_grad():
        for name, m in attention_module_names(um):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                lin = m.to_out[0] if proj == "to_out.0" else getattr(m, proj)
                key = "%s.%s" % (name, proj)
                lin.weight += LORA_ALPHA * (lora_vals[key + ".lora_up.weight"].double() @ lora_vals[key + ".lora_down.weight"].double())
        em = um(latent.double(), t.double(), ctx.double()).sample
    merged = rel(em.numpy(), e64.numpy())
    assert merged < 1e-12, merged
    meta["lora_vs_merged_f64"] = "%.3e" % merged

    for k, v in T.items():
        assert np.isfinite(np.asarray(v, np.float64)).all(), "non-finite values in " + k
    for k, v in meta.items():
        assert v != "nan", k
    # stored as F32 inputs / F64 references
    out = {}
    for k, v in T.items():
        v = np.asarray(v)
        out[k] = v.astype(np.float32) if k.startswith(("in/", "lora/")) else v.astype(np.float64)
    size = write_safetensors(args.out, out, meta)
    print("wrote %s (%d tensors, %.2f MB)" % (args.out, len(out), size / 1e6))
    for k in sorted(meta):
        if k.startswith("f32_vs") or k.startswith("lora_vs"):
            print("  %-32s %s" % (k, meta[k]))


if __name__ == "__main__":
    main()
