#!/usr/bin/python3
"""The OFFICIAL gradient fusion (Mix-of-Show 51270fd gradient_fusion.py, compose_concepts and
everything it calls, run as written) on models/tiny-sd with ED-LoRAs, for tests/test_fuse.c.
Shims only: diffusers 0.19.3 from its source tree, the transformers 4.31 CLIP stand-in of
gen_train_golden.py, float32 on the CPU (the script loads float16 on CUDA; torch 1.13 has no
float16 CPU matmul), init_stable_diffusion replaced by a loader that then calls
torch.manual_seed(SEED) (the official script never seeds; our --seed draws the same), tqdm a
pass-through. Reductions (said here and in the output's metadata): --size S replaces the
hard-coded `height = 512` / `width = 512` of decode_to_latents (the only edit of official
source, made on its text, besides get_text_feature's hard-coded reshape(-1, 768) -> the
model's hidden_size); --te-iters / --unet-iters as the script's own options.

    /usr/bin/python3 tools/ref/gen_fuse_official.py [--mos /tmp/mos] [--diffusers /tmp/diffusers-0.19.3/src]
        [--concepts tests/data/fuse/multi2.json] [--size 64] [--te-iters 100] [--unet-iters 50] [--seed 0]
        [--out tests/data/fuse/official.safetensors]

Writes, for every layer update_quasi_newton was called on (name from its log line):
  <layer>.W0, .best_W (float32), .trace (float64: every closure value, evaluation order),
  .f_W0, .f_best (float64: F.mse_loss of W0 / best_W on its K, V in double), .rows;
  every layer also .G = K^T K, .C = V^T K, .vv = |V|^2 (float64, of the official K, V as recorded);
and for the spatial stage, per concept c and hooked module m (input rows of every sampling
step, as module_io_recoder holds them): sp.<c>.<module>.G (float32 X^T X computed in double), .rows.
"""
import argparse, ast, importlib, json, logging, os, sys, types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import read_safetensors, write_safetensors, versions  # noqa: E402


# the spatial layers the compact golden keeps (rows 2560 / 640 / 40 at --size 64; widths 32, 64, 64)
SP_BLOCKS = ("down_blocks.0.attentions.1.", "down_blocks.1.attentions.0.", "mid_block.attentions.0.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mos", default="/tmp/mos")
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--model", default=os.path.join(ROOT, "models/tiny-sd"))
    ap.add_argument("--concepts", default=os.path.join(ROOT, "tests/data/fuse/multi2.json"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--te-iters", type=int, default=100)
    ap.add_argument("--unet-iters", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-kv", action="store_true", help="also write every layer's K, V (float32; large)")
    ap.add_argument("--perms", type=int, default=3, help="reruns of update_quasi_newton on permuted rows")
    ap.add_argument("--golden", action="store_true",
                    help="write the compact test file: text encoder and spatial statistics of SP_BLOCKS only, "
                         "cross-attention K/V rows instead of their statistics, no per-concept Grams")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/data/fuse/official.safetensors"))
    a = ap.parse_args()
    import gen_train_golden as gt
    gt.install_shims(a.mos, a.diffusers)
    import torch
    import torch.nn.functional as F
    sys.modules["tqdm"].tqdm = lambda it, **k: it
    acc = types.ModuleType("accelerate.state"); acc.PartialState = object; sys.modules["accelerate.state"] = acc
    sys.modules["accelerate"].state = acc
    dpm = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_multistep").DPMSolverMultistepScheduler
    ddpm = importlib.import_module("diffusers.schedulers.scheduling_ddpm").DDPMScheduler
    sys.modules["diffusers"].DPMSolverMultistepScheduler = dpm
    un = importlib.import_module("diffusers.models.unet_2d_condition")
    sys.path.insert(0, a.mos)
    gf = importlib.import_module("gradient_fusion")

    # decode_to_latents with the size reduced (text edit of the official source, nothing else)
    src = open(os.path.join(a.mos, "gradient_fusion.py")).read()
    fn = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "decode_to_latents"][0]
    body = ast.get_source_segment(src, fn)
    assert body.count("height = 512") == 1 and body.count("width = 512") == 1
    body = body.replace("height = 512", "height = %d" % a.size).replace("width = 512", "width = %d" % a.size)
    exec(compile(body, "gradient_fusion.py(decode_to_latents)", "exec"), gf.__dict__)
    # get_text_feature hard-codes SD 1.x's width in .reshape(-1, 768): the model's hidden_size
    hidden = json.load(open(os.path.join(a.model, "text_encoder", "config.json")))["hidden_size"]
    fn = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "get_text_feature"][0]
    body = ast.get_source_segment(src, fn)
    assert body.count(".reshape(-1, 768)") == 1
    body = "@torch.no_grad()\n" + body.replace(".reshape(-1, 768)", ".reshape(-1, %d)" % hidden)
    exec(compile(body, "gradient_fusion.py(get_text_feature)", "exec"), gf.__dict__)

    def load_unet(folder):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        m = un.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        sd, _ = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        m.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}, strict=True)
        return m.eval()

    saved = {}

    class Pipe:
        def save_pretrained(self, path):
            os.makedirs(path, exist_ok=True)
            saved["te"] = {k: v.clone() for k, v in self.text_encoder.state_dict().items()}
            saved["unet"] = {k: v.clone() for k, v in self.unet.state_dict().items()}

    class Tokenizer(gt.CLIPTokenizer):   # get_text_feature's extra keywords (length output unused)
        def __call__(self, prompts, padding=None, max_length=None, truncation=False, return_tensors=None,
                     return_length=False, return_overflowing_tokens=False):
            assert padding in (None, "do_not_pad", "max_length") and not return_overflowing_tokens
            return super().__call__(prompts, padding=None if padding == "do_not_pad" else padding,
                                    max_length=max_length, truncation=truncation, return_tensors=return_tensors)

    def init_stable_diffusion(path, device):
        p = Pipe()
        p.tokenizer = Tokenizer.from_pretrained(path, subfolder="tokenizer")
        p.tokenizer.model_max_length = 77
        p.text_encoder = sys.modules["transformers"].CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        p.unet = load_unet(os.path.join(path, "unet"))
        p.vae = torch.nn.Linear(1, 1)
        sc = json.load(open(os.path.join(path, "scheduler", "scheduler_config.json")))
        torch.manual_seed(a.seed)
        return p, ddpm.from_config(sc), dpm.from_config(sc)
    gf.init_stable_diffusion = init_stable_diffusion

    # the layer being optimised: its log line; closure values: chunk_compute_mse's results
    state = {"layer": None, "trace": None}

    class Grab(logging.Handler):
        def emit(self, rec):
            msg = rec.getMessage()
            if "] optimizing " in msg:
                state["layer"] = msg.split("] optimizing ")[1].strip()
    logging.getLogger().addHandler(Grab())
    logging.getLogger().setLevel(logging.INFO)
    ccm = gf.chunk_compute_mse

    def chunk_compute_mse(K, V, W, device, chunk_size=5000):
        loss = ccm(K, V, W, device, chunk_size)
        if state["trace"] is not None:
            state["trace"].append(float(loss.item()))
        return loss
    gf.chunk_compute_mse = chunk_compute_mse
    uqn = gf.update_quasi_newton
    out = {}

    def update_quasi_newton(K, V, W, iters, device):
        name = state["layer"]
        W0 = W.detach().clone()
        state["trace"] = []
        best = uqn(K, V, W, iters, device)
        Kd, Vd = K.detach().double(), V.detach().double()
        f = lambda M: float(((Kd @ M.detach().double().t() - Vd) ** 2).mean())
        out[name + ".W0"] = W0.float().numpy()
        out[name + ".best_W"] = best.detach().float().numpy()
        out[name + ".trace"] = np.array(state["trace"], dtype=np.float64)
        out[name + ".f_W0"] = np.array([f(W0)])
        out[name + ".f_best"] = np.array([f(best)])
        out[name + ".rows"] = np.array([K.shape[0]], dtype=np.int64)
        # the official K, V as statistics (spatial V as recorded: float32 outputs, bias removed)
        out[name + ".G"] = (Kd.t() @ Kd).numpy()
        out[name + ".C"] = (Vd.t() @ Kd).numpy()
        out[name + ".vv"] = np.array([float((Vd ** 2).sum())])
        if "attn2.to_k" in name or "attn2.to_v" in name:
            out[name + ".K_rows"] = K.detach().float().numpy()
            out[name + ".V_rows"] = V.detach().float().numpy()
        if a.save_kv:
            out[name + ".K"] = K.detach().float().numpy()
            out[name + ".V"] = V.detach().float().numpy()
        # How much of the trace is a property of the algorithm and the features, and how much of
        # float32 rounding: the official update_quasi_newton again on the same K, V with the rows
        # permuted (the same objective; only chunk_compute_mse's float32 summation order differs).
        # "stable": leading closure values on which every rerun (and the exact run below) agrees
        # with the trace to 1e-4; "spread": for each of the first 10 closure values, the largest
        # relative deviation of a rerun from the trace; "perm_best": f(best W) of each rerun.
        tr0, stable, pbest = out[name + ".trace"], len(out[name + ".trace"]), []
        spread = np.zeros(10)   # per closure value: the largest relative deviation of a rerun

        def deviate(tr1):
            for k in range(10):
                spread[k] = max(spread[k], abs(tr1[k] - tr0[k]) / abs(tr0[k]) if k < min(len(tr0), len(tr1)) else np.inf)
        for ps in range(1, a.perms + 1):
            perm = torch.randperm(K.shape[0], generator=torch.Generator().manual_seed(ps))
            state["trace"] = []
            b = uqn(K[perm].contiguous(), V[perm].contiguous(), W0.clone(), iters, device)
            tr1 = state["trace"]
            deviate(tr1)
            k = 0
            while k < min(len(tr0), len(tr1)) and abs(tr1[k] - tr0[k]) <= 1e-4 * abs(tr0[k]):
                k += 1
            stable = min(stable, k)
            pbest.append(f(b))
        # torch.optim.LBFGS, the official options, on an exact closure: f and its gradient from
        # the double statistics, rounded to float32 (what mixshow's closure computes): the
        # official algorithm without the rounding of chunk_compute_mse's float32 evaluation
        G, C, vv, nd = Kd.t() @ Kd, Vd.t() @ Kd, float((Vd ** 2).sum()), K.shape[0] * W0.shape[0]
        Wx = W0.clone().requires_grad_(True)
        ex, exbest = [], [None]

        def exact():
            wd = Wx.detach().double()
            l = ((vv - 2 * (wd * C).sum() + ((wd @ G) * wd).sum()) / nd).float()
            Wx.grad = (2 * (wd @ G - C) / nd).float()
            if not ex or float(l) < min(ex):
                exbest[0] = Wx.detach().clone()
            ex.append(float(l))
            return l
        torch.optim.LBFGS([Wx], lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe",
                          tolerance_grad=1e-16, tolerance_change=1e-16).step(exact)
        out[name + ".trace_exact"] = np.array(ex, dtype=np.float64)
        deviate(ex)
        out[name + ".spread"] = spread
        k = 0   # the exact run is one more rerun: float32 evaluation noise of the trace itself
        while k < min(len(tr0), len(ex)) and abs(ex[k] - tr0[k]) <= 1e-4 * abs(tr0[k]):
            k += 1
        stable = min(stable, k)
        out[name + ".stable"] = np.array([stable], dtype=np.int64)
        out[name + ".perm_best"] = np.array(pbest + [f(exbest[0])], dtype=np.float64)
        out[name + ".iters"] = np.array([iters], dtype=np.int64)
        state["trace"] = None
        print("  %-70s rows %6d  f(W0) %.4e  best %.4e  evals %d  stable %d  reruns' best / best %s" % (
            name, K.shape[0], f(W0), f(best), len(tr0), stable, " ".join("%.4f" % (x / f(best)) for x in pbest)), flush=True)
        return best
    gf.update_quasi_newton = update_quasi_newton

    # spatial features per concept: what module_io_recoder holds after each decode_to_latents
    d2l = gf.decode_to_latents
    concept_idx = [0]

    def decode_to_latents(*args, **kw):
        r = d2l(*args, **kw)
        c = concept_idx[0]
        for mod, io in gf.module_io_recoder.items():
            X = torch.cat(io["input"], 0)
            X = X.reshape(-1, X.shape[-1]).double()
            out["sp.%d.%s.G" % (c, mod)] = (X.t() @ X).float().numpy()
            out["sp.%d.%s.rows" % (c, mod)] = np.array([X.shape[0]], dtype=np.int64)
        concept_idx[0] += 1
        return r
    gf.decode_to_latents = decode_to_latents

    os.chdir(os.path.dirname(os.path.abspath(a.concepts)))
    gf.compose_concepts(os.path.basename(a.concepts), a.te_iters, a.unet_iters, a.model, "/tmp", "gen_fuse_official", "cpu")
    meta = {"versions": versions(), "size": str(a.size), "te_iters": str(a.te_iters), "unet_iters": str(a.unet_iters),
            "seed": str(a.seed), "concepts": os.path.basename(a.concepts),
            "shims": "float32 CPU; init_stable_diffusion loads then torch.manual_seed(seed); decode_to_latents height/width = size"}
    if a.golden:
        keep = {}
        for k, v in out.items():
            layer = k[:k.index(".weight.") + 7] if ".weight." in k else None
            if k.startswith("sp.") or layer is None:
                continue
            kv = "attn2.to_k" in layer or "attn2.to_v" in layer
            if not (layer.startswith("text_model") or kv or any(layer.startswith(b) for b in SP_BLOCKS)):
                continue
            if kv and (k.endswith(".G") or k.endswith(".C")):
                continue
            keep[k] = v
        for k, v in out.items():     # cross-attention K/V: their 12-ish rows are smaller than G, C
            if k.endswith(".weight.K_rows") or k.endswith(".weight.V_rows"):
                keep[k] = v
        out = keep
        meta["selection"] = "text encoder + cross K/V (rows) + spatial layers of " + ",".join(SP_BLOCKS)
    write_safetensors(a.out, out, meta)
    print("wrote", a.out, len(out), "tensors")


if __name__ == "__main__":
    main()
