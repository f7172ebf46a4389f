#!/usr/bin/python3
"""Golden tensors for the UNet attention probe (models/unet.c, UNetActs.probe*): diffusers 0.19.3
UNet2DConditionModel on tiny-sd with an attn2 processor that returns and stores the attention
probabilities as Mix-of-Show's EDLoRA_Control_AttnProcessor + AttentionStore do
(mixofshow/models/edlora.py, utils/ptp_util.py; read by trainer_edlora.py cal_attn_reg).

Writes tests/data/probe_golden.safetensors (read by tests/test_unet.c). Run with Debian's
python3-torch (torch 1.13) and numpy:

    /usr/bin/python3 tools/ref/gen_probe_golden.py [--diffusers /tmp/diffusers-0.19.3/src]
                                                   [--model models/tiny-sd]

The model import, module orders and LoRA wrapper are those of gen_unet_golden.py (imported).
Every reference value is computed in float64 (float32 inputs and weights upcast) and stored
rounded to nearest float32 (the test converts F64 that way too; it keeps the file under 2 MB);
the same run in torch float32 is compared with float64 and the errors stored in the metadata.

Setting: batch 2, timesteps 999 and 423.5, layer-wise contexts (16 layers, Mix-of-Show order),
LoRA (rank 2, alpha 0.75, non-zero up) on every to_q/to_k/to_v/to_out.0, and the loss
    L = sum(R * eps) + sum_l sum(Q_l * probs_l[n, :, :, cols[n]])
with probs_l (2*heads, h*w, 77) the softmax of attn2 layer l (row n*heads + head, diffusers'
head_to_batch_dim) viewed as (2, heads, h*w, 77), cols (2, 3) per sample (sample 0 repeats a
position: its gradients add up).

Keys (inputs F32/I32, references F32 from float64), <s> = "16x16" or "8x12" (the latent size):
  in/t (2)  in/layer_ctx (16,2,77,32)  in/cols (2,3) I32
  in/<s>/latent (2,4,h,w)  in/<s>/R (2,4,h,w)  in/<s>/Q/<l> (2,heads,h_l*w_l,3)
  lora/<module>.lora_down.weight (r,in), .lora_up.weight (out,r)
  <s>/eps  <s>/probe/<l> (2,heads,h_l*w_l,3)  <s>/grad/layer_ctx (16,2,77,32)
  <s>/grad_lora/<module>.lora_down.weight ...
Metadata: "probe_share/<s>/..." = |grad(L) - grad(sum R eps)| / |grad(L)|: how much of each
gradient the probe term carries (a test that dropped it would miss by that much).
"""
import argparse, os, sys
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import read_safetensors, write_safetensors, versions  # noqa: E402
from gen_unet_golden import import_unet, cross_attention_modules, attention_module_names  # noqa: E402

SEED = 4321
N, TK = 2, 77
SIZES = [(16, 16), (8, 12)]
TIMESTEPS = [999.0, 423.5]
LORA_RANK, LORA_ALPHA = 2, 0.75
COLS = [[5, 6, 5], [2, 9, 40]]
Q_SCALE = 3.0       # probabilities are ~1/77: this puts the probe term on the scale of sum(R eps)


class StoreProcessor:
    """EDLoRA_Control_AttnProcessor for attn2 (is_cross; no mask, no group/spatial norm, not
    residual, rescale 1 in SD 1.x): layer idx reads its own context and hands its
    attention_probs (2*heads, h*w, 77) to the store, which keeps it in the graph."""
    def __init__(self, idx, ctx_store, probs_store):
        self.idx, self.ctx_store, self.probs_store = idx, ctx_store, probs_store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        import torch
        encoder_hidden_states = self.ctx_store[self.idx]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states)).contiguous()
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states)).contiguous()
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states)).contiguous()
        attention_probs = attn.get_attention_scores(query, key, None)
        self.probs_store[self.idx] = attention_probs
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--model", default=os.path.join(here, "..", "..", "models", "tiny-sd"))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "data", "probe_golden.safetensors"))
    args = ap.parse_args()

    import json
    import torch
    torch.set_num_threads(1)
    UNet, _ = import_unet(args.diffusers)
    cfg = json.load(open(os.path.join(args.model, "unet", "config.json")))
    weights, _ = read_safetensors(os.path.join(args.model, "unet", "diffusion_pytorch_model.safetensors"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}

    def make(dtype):
        torch.manual_seed(0)
        u = UNet(**cfg)
        u.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()}, strict=True)
        u.eval()
        return u.to(dtype)

    g = torch.Generator().manual_seed(SEED)
    t = torch.tensor(TIMESTEPS, dtype=torch.float32)
    u64 = make(torch.float64)
    n_cross = len(cross_attention_modules(u64))
    D = cfg["cross_attention_dim"]
    layer_ctx = torch.randn((n_cross, N, TK, D), generator=g)
    cols = torch.tensor(COLS, dtype=torch.int64)
    T = {"in/t": t.numpy(), "in/layer_ctx": layer_ctx.numpy(), "in/cols": cols.numpy().astype(np.int32)}

    lora_vals = {}
    for name, m in attention_module_names(u64):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            lin = m.to_out[0] if proj == "to_out.0" else getattr(m, proj)
            key = "%s.%s" % (name, proj)
            lora_vals[key + ".lora_down.weight"] = 0.3 * torch.randn((LORA_RANK, lin.in_features), generator=g)
            lora_vals[key + ".lora_up.weight"] = 0.3 * torch.randn((lin.out_features, LORA_RANK), generator=g)
    for k, v in lora_vals.items():
        T["lora/" + k] = v.numpy()

    class LoRALinear(torch.nn.Module):
        def __init__(self, base, down, up):
            super().__init__()
            self.base, self.down, self.up = base, down, up

        def forward(self, x):
            F = torch.nn.functional
            return self.base(x) + LORA_ALPHA * F.linear(F.linear(x, self.down), self.up)

    meta = {"diffusers": "0.19.3", "seed": str(SEED), "model": "tiny-sd (models/tiny-sd)",
            "timesteps": str(TIMESTEPS), "lora_rank": str(LORA_RANK), "lora_alpha": repr(LORA_ALPHA),
            "n_cross": str(n_cross), "cols": str(COLS), "q_scale": repr(Q_SCALE),
            "mixofshow": "51270fd (EDLoRA_Control_AttnProcessor, AttentionStore)"}
    meta.update(versions())

    def rel(a, b):
        a = np.asarray(a, np.float64); b = np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    def run(dt, latent, R, Q, with_probe=True):
        u = make(dt)
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
        ctx_store = [layer_ctx[i].to(dt).clone().requires_grad_(True) for i in range(n_cross)]
        probs_store = [None] * n_cross
        for i, m in enumerate(cross_attention_modules(u)):
            m.set_processor(StoreProcessor(i, ctx_store, probs_store))
        e = u(latent.to(dt), t.to(dt) if dt == torch.float64 else t, None).sample
        loss = (R.to(dt) * e).sum()
        probes = []
        for l in range(n_cross):
            pr = probs_store[l]
            heads = pr.shape[0] // N
            pr = pr.reshape(N, heads, pr.shape[1], TK)           # row n*heads + h
            sel = torch.stack([pr[n][..., cols[n]] for n in range(N)])   # (N, heads, hw, ncol)
            probes.append(sel)
            if with_probe:
                loss = loss + (Q[l].to(dt) * sel).sum()
        loss.backward()
        grads = {k: v.grad for k, v in params.items()}
        return e.detach(), [p.detach() for p in probes], torch.stack([s.grad for s in ctx_store]), grads

    cat = lambda d: np.concatenate([d[k].numpy().ravel() for k in sorted(d)])

    def finite(res):
        e, pr, gc, gp = res
        return all(bool(torch.isfinite(x).all()) for x in [e, gc] + list(pr) + list(gp.values()))

    reruns = [0]

    def run_checked(dt, latent, R, Q, with_probe=True):
        # torch 1.13 on this machine now and then returns NaN somewhere in the UNet at the 1x2
        # level of the 8x12 latent (first seen at the mid block's input; not reproducible with
        # forward hooks attached, so some kernel reads uninitialised memory). A run is kept only
        # when every value is finite and a second run gives the same values bit for bit.
        for attempt in range(6):
            a = run(dt, latent, R, Q, with_probe)
            if not finite(a):
                reruns[0] += 1
                continue
            b = run(dt, latent, R, Q, with_probe)
            if finite(b) and all(torch.equal(x, y) for x, y in zip([a[0], a[2]] + a[1] + [a[3][k] for k in sorted(a[3])],
                                                                  [b[0], b[2]] + b[1] + [b[3][k] for k in sorted(b[3])])):
                return a
            reruns[0] += 1
        raise RuntimeError("no two identical finite runs in 6 attempts")
    for (h, w) in SIZES:
        s = "%dx%d" % (h, w)
        latent = torch.randn((N, 4, h, w), generator=g)
        R = torch.randn((N, 4, h, w), generator=g)
        # probe shapes from a first run (Q unused when with_probe is False)
        _, pr0, _, _ = run_checked(torch.float64, latent, R, None, with_probe=False)
        Q = [Q_SCALE * torch.randn(tuple(p.shape), generator=g) for p in pr0]
        T["in/%s/latent" % s] = latent.numpy()
        T["in/%s/R" % s] = R.numpy()
        for l, q in enumerate(Q):
            T["in/%s/Q/%d" % (s, l)] = q.numpy()
        e64, p64, gc64, gp64 = run_checked(torch.float64, latent, R, Q)
        e32, p32, gc32, gp32 = run_checked(torch.float32, latent, R, Q)
        T["%s/eps" % s] = e64.numpy()
        for l in range(n_cross):
            T["%s/probe/%d" % (s, l)] = p64[l].numpy()
        T["%s/grad/layer_ctx" % s] = gc64.numpy()
        for k, v in gp64.items():
            T["%s/grad_lora/%s" % (s, k)] = v.numpy()
        meta["f32_vs_f64/%s/eps" % s] = "%.3e" % rel(e32.numpy(), e64.numpy())
        meta["f32_vs_f64/%s/probe" % s] = "%.3e" % rel(np.concatenate([p.numpy().ravel() for p in p32]),
                                                       np.concatenate([p.numpy().ravel() for p in p64]))
        meta["f32_vs_f64/%s/probe_worst_layer" % s] = "%.3e" % max(rel(a.numpy(), b.numpy()) for a, b in zip(p32, p64))
        meta["f32_vs_f64/%s/grad/layer_ctx" % s] = "%.3e" % rel(gc32.numpy(), gc64.numpy())
        meta["f32_vs_f64/%s/grad_lora" % s] = "%.3e" % rel(cat(gp32), cat(gp64))
        _, _, gc0, gp0 = run_checked(torch.float64, latent, R, Q, with_probe=False)
        meta["probe_share/%s/grad/layer_ctx" % s] = "%.3e" % rel(gc0.numpy(), gc64.numpy())
        meta["probe_share/%s/grad_lora" % s] = "%.3e" % rel(cat(gp0), cat(gp64))

    for k, v in T.items():
        assert np.isfinite(np.asarray(v, np.float64)).all(), "non-finite values in " + k
    out = {}
    for k, v in T.items():
        v = np.asarray(v)
        if v.dtype == np.int32:
            out[k] = v
        else:   # references rounded to nearest float32: what the test's st_to_f32 reads from F64 anyway
            out[k] = v.astype(np.float32)
    size = write_safetensors(args.out, out, meta)
    print("wrote %s (%d tensors, %.2f MB); runs repeated for NaN or mismatch: %d" % (args.out, len(out), size / 1e6, reruns[0]))
    for k in sorted(meta):
        if k.startswith(("f32_vs", "probe_share")):
            print("  %-40s %s" % (k, meta[k]))


if __name__ == "__main__":
    main()
