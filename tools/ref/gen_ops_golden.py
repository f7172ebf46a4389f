"""Golden tensors for every op of mixshow.h's `ops` and `gemm` sections, from PyTorch autograd.

    /usr/bin/python3 tools/ref/gen_ops_golden.py      # writes tests/data/ops_golden.safetensors

Inputs are drawn in float32 (torch.Generator, seed SEED, in the order below). Every forward and
backward is then computed in float64 from those float32 values, with torch's own functions
(F.group_norm, F.layer_norm, F.silu, F.gelu, F.conv2d, F.pad, F.interpolate, F.avg_pool2d,
nn.PixelUnshuffle, F.embedding, F.softmax, F.linear), and stored rounded to F32. Exceptions:
  - the MSE losses are stored as F64 scalars ('<op>.loss'), computed as Mix-of-Show does
    ((p - t)^2 in float32, then float64 because its masks are float64);
  - timestep_embedding is computed in float32, as diffusers' get_timestep_embedding does;
  - attention (torch 1.13 has no F.scaled_dot_product_attention) is softmax(scale QK^T) V
    written out, with a torch.tril causal mask; '<op>.lse' is torch.logsumexp of the logits.
Keys: '<op>.<tensor>', e.g. groupnorm.x, groupnorm.w, groupnorm.b, groupnorm.out,
groupnorm.dout (random), groupnorm.dx, groupnorm.dw, groupnorm.db. The dims of each case are
in tests/test_golden.c, which checks them against the stored shapes.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 20230518
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data", "ops_golden.safetensors")

gen = torch.Generator().manual_seed(SEED)
golden = {}


def randn(*shape, std=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * std)


def rand(*shape, lo=0.0, hi=1.0):
    return torch.rand(*shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo


def case(op, fn, inputs, params=(), extra_out=()):
    """inputs: {name: float32 tensor}; fn(**float64 copies) -> out, or a tuple (out, *extra)
    named by extra_out. Stores inputs, out, extras, a random dout and d<name> for every
    floating input not listed in params (autograd of out with grad_output dout, in float64)."""
    x64 = {k: v.double().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    res = fn(**x64)
    outs = res if isinstance(res, tuple) else (res,)
    out = outs[0]
    dout = randn(*out.shape)
    for k, v in inputs.items():
        golden[f"{op}.{k}"] = v
    golden[f"{op}.out"] = out.detach().float()
    for name, t in zip(extra_out, outs[1:]):
        golden[f"{op}.{name}"] = t.detach().float()
    golden[f"{op}.dout"] = dout
    need = [k for k, v in x64.items() if v.requires_grad and k not in params]
    grads = torch.autograd.grad(out, [x64[k] for k in need], dout.double(), allow_unused=True)
    for k, g in zip(need, grads):
        golden[f"{op}.d{k}"] = (g if g is not None else torch.zeros_like(x64[k])).float()


# ---- GEMM: C = alpha op(A) op(B) + beta C (forward only) -------------------------------------
for ta in (0, 1):
    for tb in (0, 1):
        M, N, K = 13, 11, 17
        A = randn(*((K, M) if ta else (M, K)))
        B = randn(*((N, K) if tb else (K, N)))
        C = randn(M, N)
        opA = A.double().t() if ta else A.double()
        opB = B.double().t() if tb else B.double()
        name = f"gemm_{'t' if ta else 'n'}{'t' if tb else 'n'}"
        golden[f"{name}.a"], golden[f"{name}.b"], golden[f"{name}.c"] = A, B, C
        golden[f"{name}.out"] = (0.75 * (opA @ opB) + (-0.5) * C.double()).float()   # alpha 0.75, beta -0.5

# ---- linear ------------------------------------------------------------------------------------
case("linear", lambda x, w, b: F.linear(x, w, b), {"x": randn(5, 7), "w": randn(6, 7, std=0.4), "b": randn(6)})

# ---- conv2d: 3x3 s1 p1; 3x3 s2 p1 (UNet downsample); F.pad (0,1,0,1) + 3x3 s2 p0 (VAE encoder
# downsample); 1x1 (proj_in/out) --------------------------------------------------------------------
case("conv2d_k3s1p1", lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=1),
     {"x": randn(2, 3, 7, 6), "w": randn(5, 3, 3, 3, std=0.3), "b": randn(5)})
case("conv2d_k3s2p1", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
     {"x": randn(2, 4, 9, 8), "w": randn(3, 4, 3, 3, std=0.3), "b": randn(3)})
case("conv2d_pad0101_k3s2", lambda x, w, b: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2),
     {"x": randn(1, 3, 8, 6), "w": randn(4, 3, 3, 3, std=0.3), "b": randn(4)})
case("conv2d_k1", lambda x, w, b: F.conv2d(x, w, b),
     {"x": randn(2, 6, 3, 5), "w": randn(7, 6, 1, 1, std=0.4), "b": randn(7)})

# ---- normalisation -------------------------------------------------------------------------------
case("groupnorm", lambda x, w, b: F.group_norm(x, 3, w, b, eps=1e-5),
     {"x": randn(2, 6, 5, 3) * 2 + 0.5, "w": 1 + randn(6, std=0.2), "b": randn(6, std=0.2)})
case("groupnorm_eps6", lambda x, w, b: F.group_norm(x, 4, w, b, eps=1e-6),
     {"x": randn(1, 8, 3, 7), "w": 1 + randn(8, std=0.2), "b": randn(8, std=0.2)})
case("layernorm", lambda x, w, b: F.layer_norm(x, (10,), w, b, eps=1e-5),
     {"x": randn(7, 10) * 3 - 1, "w": 1 + randn(10, std=0.2), "b": randn(10, std=0.2)})

# ---- activations (values kept away from relu's kink at 0) --------------------------------------
act_x = randn(37) * 2.5
act_x = torch.where(act_x.abs() < 1e-3, torch.full_like(act_x, 0.5), act_x)
case("silu", lambda x: F.silu(x), {"x": act_x})
case("gelu", lambda x: F.gelu(x), {"x": act_x})                      # exact erf form
case("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x), {"x": act_x})
case("relu", lambda x: F.relu(x), {"x": act_x})


def geglu(x):                                                        # diffusers GEGLU after proj
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


case("geglu", geglu, {"x": randn(5, 12) * 1.5})
case("softmax", lambda x: F.softmax(x, dim=-1), {"x": randn(4, 9) * 2})


# ---- attention ------------------------------------------------------------------------------------
def attention(q, k, v, H, causal, scale):
    B, Tq, HD = q.shape
    Tk, Dh = k.shape[1], HD // H
    qh = q.reshape(B, Tq, H, Dh).permute(0, 2, 1, 3)                # (B,H,Tq,Dh)
    kh = k.reshape(B, Tk, H, Dh).permute(0, 2, 1, 3)
    vh = v.reshape(B, Tk, H, Dh).permute(0, 2, 1, 3)
    logits = scale * qh @ kh.transpose(-1, -2)                       # (B,H,Tq,Tk)
    if causal:
        mask = torch.ones(Tq, Tk, dtype=torch.bool).tril()
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                            # (B,H,Tq)
    out = torch.softmax(logits, dim=-1) @ vh                         # (B,H,Tq,Dh)
    return out.permute(0, 2, 1, 3).reshape(B, Tq, HD), lse


case("attention", lambda q, k, v: attention(q, k, v, 3, False, 4 ** -0.5),
     {"q": randn(2, 5, 12), "k": randn(2, 7, 12), "v": randn(2, 7, 12)}, extra_out=("lse",))
case("attention_causal", lambda q, k, v: attention(q, k, v, 2, True, 5 ** -0.5),
     {"q": randn(2, 6, 10) * 1.5, "k": randn(2, 6, 10) * 1.5, "v": randn(2, 6, 10)}, extra_out=("lse",))

# ---- resampling -------------------------------------------------------------------------------------
case("upsample_nearest2x", lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), {"x": randn(2, 3, 3, 5)})
case("avgpool2x2", lambda x: F.avg_pool2d(x, kernel_size=2, stride=2), {"x": randn(2, 3, 4, 6)})
case("pixel_unshuffle", lambda x: torch.nn.PixelUnshuffle(8)(x), {"x": randn(1, 3, 16, 24)})
case("concat_channels", lambda a, b: torch.cat([a, b], dim=1), {"a": randn(2, 3, 5), "b": randn(2, 4, 5)})

# ---- elementwise ----------------------------------------------------------------------------------
case("add", lambda a, b: a + b, {"a": randn(23), "b": randn(23)})
case("mul", lambda a, b: a * b, {"a": randn(23), "b": randn(23)})
S = float(torch.tensor(0.3, dtype=torch.float32))                    # the C side passes 0.3f
case("scale", lambda x: S * x, {"x": randn(23)})
case("add_bias_nc", lambda x, t: x + t[:, :, None], {"x": randn(2, 3, 4), "t": randn(2, 3)})

# ---- embedding (ids stored as I32; repeated ids exercise the scatter-add) ------------------------
ids = torch.tensor([3, 0, 7, 3, 9, 3], dtype=torch.int64)
table = randn(10, 4)
case("embedding", lambda table: F.embedding(ids, table), {"table": table})
golden["embedding.ids"] = ids.to(torch.int32)

# ---- Mix-of-Show masked MSE (train_edlora.py) and plain F.mse_loss ---------------------------------
pred, target = randn(2, 4, 5, 3), randn(2, 4, 5, 3)
mask = (rand(2, 1, 5, 3) > 0.35).to(torch.float64)                   # float64 like the numpy masks
mask[1, 0, 0, 0] = 0.5                                                # a soft edge value too
dloss = 0.8125
for name, w in (("mse_masked", mask), ("mse", None)):
    p = pred.clone().requires_grad_(True)
    if w is None:
        loss = F.mse_loss(p.float(), target.float(), reduction="mean").double()
    else:
        per = F.mse_loss(p.float(), target.float(), reduction="none")       # float32
        loss = ((per * w).sum([1, 2, 3]) / w.sum([1, 2, 3])).mean()         # promoted to float64
    (g,) = torch.autograd.grad(loss, [p], torch.tensor(dloss, dtype=loss.dtype))
    golden[f"{name}.pred"], golden[f"{name}.target"] = pred, target
    if w is not None:
        golden[f"{name}.weight"] = w.float()
    golden[f"{name}.loss"] = loss.detach().double().reshape(())
    golden[f"{name}.dloss"] = torch.tensor(dloss, dtype=torch.float32)
    golden[f"{name}.dpred"] = g.float()
# the same losses in float64 from the float32 inputs (what the C ref computes)
for name, w in (("mse_masked", mask), ("mse", None)):
    d2 = (pred.double() - target.double()) ** 2
    golden[f"{name}.loss64"] = (d2.mean() if w is None else ((d2 * w).sum([1, 2, 3]) / w.sum([1, 2, 3])).mean()).reshape(())


# ---- timestep embedding: diffusers 0.19.3 embeddings.get_timestep_embedding, in float32 -------------
def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1.0,
                           scale=1.0, max_period=10000):
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].float() * emb[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


t_sd = torch.tensor([0, 1, 17, 250, 999, 500], dtype=torch.float32)
golden["timestep_embedding.t"] = t_sd
golden["timestep_embedding.out"] = get_timestep_embedding(t_sd, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
t_odd = torch.tensor([3, 421.5], dtype=torch.float32)
golden["timestep_embedding_odd.t"] = t_odd
golden["timestep_embedding_odd.out"] = get_timestep_embedding(t_odd, 7, flip_sin_to_cos=False, downscale_freq_shift=1)

meta = common.versions()
meta.update({"script": "tools/ref/gen_ops_golden.py", "seed": str(SEED),
             "precision": "inputs float32; forward/backward float64 rounded to F32; *.loss, *.loss64 F64; "
                          "timestep_embedding float32 as diffusers",
             "gemm": "alpha 0.75, beta -0.5", "mse": "dloss 0.8125"})
for k, v in golden.items():
    if v.dtype == torch.float64 and not (k.endswith(".loss") or k.endswith(".loss64")):
        raise SystemExit(f"{k} is float64")
n = common.write_safetensors(os.path.normpath(OUT), golden, meta)
print(f"wrote {os.path.normpath(OUT)}: {len(golden)} tensors, {n} bytes")
