#!/usr/bin/python3
"""Golden files for gradient fusion (mixshow_fuse.c, models/optim.c ms_lbfgs), read by
tests/test_fuse.c. Writes tests/data/fuse/lbfgs_golden.safetensors:

  case <k>: X (n, d_in) rows of all concepts, W0 (d_out, d_in), Wc.<i> each concept's merged
  weight, rows.<i> its row count (targets V = X_i Wc_i^T, as the official hooks record them,
  bias removed), and what the OFFICIAL update_quasi_newton (gradient_fusion.py of Mix-of-Show
  51270fd, its source taken from the file and run as is) does with them: trace (every closure
  value, in evaluation order), best_W (what it returns), f_best (F.mse_loss of best_W in double).

    /usr/bin/python3 tools/ref/gen_fuse_golden.py [--mos /tmp/mos]
    /usr/bin/python3 tools/ref/gen_fuse_golden.py --edloras   (random ED-LoRAs concept_{a,b,c}.pth
        for models/tiny-sd and the multi-concept JSON multi.json, as the official files are)

update_quasi_newton is torch.optim.LBFGS(lr=1, max_iter=iters, history_size=25,
line_search_fn='strong_wolfe', tolerance_grad=1e-16, tolerance_change=1e-16) with a closure
that keeps the best W seen. Cases: an underdetermined problem (K/V-like: fewer rows than
inputs), an overdetermined ill-conditioned one (singular values of X spread over 1e4), and an
overdetermined well-conditioned one.
"""
import argparse, ast, logging, os, sys

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import versions, write_safetensors  # noqa: E402


def official_functions(mos):
    """chunk_compute_mse and update_quasi_newton from gradient_fusion.py, run as written."""
    src = open(os.path.join(mos, "gradient_fusion.py")).read()
    tree = ast.parse(src)
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name in ("chunk_compute_mse", "update_quasi_newton")]
    assert len(keep) == 2
    ns = {"torch": torch, "F": F, "optim": optim, "np": np, "logging": logging}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "gradient_fusion.py", "exec"), ns)
    return ns


def make_case(g, d_in, d_out, rows, cond, rank=4, scale=0.3):
    Xs = []
    for n in rows:
        A = torch.randn(n, d_in, generator=g)
        if cond > 1:
            U, S, Vh = torch.linalg.svd(A, full_matrices=False)
            S = torch.logspace(0, -np.log10(cond), S.numel())
            A = (U * S) @ Vh
        Xs.append(A.float())
    W0 = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).float()
    Wc = []
    for _ in rows:
        down = torch.randn(rank, d_in, generator=g) * scale
        up = torch.randn(d_out, rank, generator=g) * scale
        Wc.append((W0 + 1.0 * up @ down).float())
    return Xs, W0, Wc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mos", default="/tmp/mos")
    a = ap.parse_args()
    ns = official_functions(a.mos)
    g = torch.Generator().manual_seed(1234)
    cases = [("under", 24, 16, [4, 5, 3], 1, 50),
             ("illcond", 16, 8, [40, 30], 1e4, 40),
             ("over", 12, 10, [30, 25, 20], 1, 30)]
    out = {}
    for name, d_in, d_out, rows, cond, iters in cases:
        Xs, W0, Wc = make_case(g, d_in, d_out, rows, cond)
        X = torch.cat(Xs, 0)
        V = torch.cat([x @ w.T for x, w in zip(Xs, Wc)], 0)
        trace = []
        orig_mse = ns["chunk_compute_mse"]

        def traced(K, Vt, W, device, chunk_size=5000):
            loss = orig_mse(K, Vt, W, device, chunk_size)
            trace.append(float(loss))
            return loss
        ns["chunk_compute_mse"] = traced
        best = ns["update_quasi_newton"](X.clone(), V.clone(), W0.clone(), iters=iters, device="cpu")
        ns["chunk_compute_mse"] = orig_mse
        # f in double with exact targets X_i Wc_i^T (the official V above is float32-rounded)
        Xd = X.double()
        Vd = torch.cat([x.double() @ w.double().T for x, w in zip(Xs, Wc)], 0)
        f = lambda W: float(((Xd @ W.double().T - Vd) ** 2).mean())
        out[f"{name}.X"] = X.numpy()
        out[f"{name}.W0"] = W0.numpy()
        for i, w in enumerate(Wc):
            out[f"{name}.Wc.{i}"] = w.numpy()
            out[f"{name}.rows.{i}"] = np.array([rows[i]], dtype=np.int64)
        out[f"{name}.iters"] = np.array([iters], dtype=np.int64)
        out[f"{name}.trace"] = np.array(trace, dtype=np.float64)
        out[f"{name}.best_W"] = best.detach().float().numpy()
        out[f"{name}.f_best"] = np.array([f(best.detach())], dtype=np.float64)
        out[f"{name}.f_W0"] = np.array([f(W0)], dtype=np.float64)
        print(f"{name}: {len(trace)} closure calls, f(W0) {f(W0):.6e} -> best {f(best.detach()):.6e}")
    meta = {"generator": "tools/ref/gen_fuse_golden.py", "seed": "1234"}
    meta.update(versions())
    path = os.path.join(ROOT, "tests/data/fuse/lbfgs_golden.safetensors")
    n = write_safetensors(path, out, meta)
    print(f"wrote {path} ({n} bytes)")


if __name__ == "__main__" and "--edloras" not in sys.argv:
    main()


# ---------------------------------------------------------------------------------------------
# Random ED-LoRAs for the tiny model (tests/data/fuse/concept_*.pth + multi.json), saved as the
# official trainer saves them: torch.save({'params': {'new_concept_embedding', 'text_encoder',
# 'unet'}}), `tokens` (16) rows per word, rank 4, LoRA on text q/k/v/out_proj and every UNet
# attention to_q/k/v/out.0.
# ---------------------------------------------------------------------------------------------
def make_edloras(model_dir, out_dir, names, seed=7, tokens=16):
    from common import read_safetensors
    te, _ = read_safetensors(os.path.join(model_dir, "text_encoder/model.safetensors"))
    un, _ = read_safetensors(os.path.join(model_dir, "unet/diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    D = te["text_model.embeddings.token_embedding.weight"].shape[1]
    entries = []
    for ci, (words, alpha_u, alpha_t) in enumerate(names):
        emb = {w: (torch.randn(tokens, D, generator=g) * 0.3) for w in words}
        def lora(keys):
            d = {}
            for k in keys:
                W = keys[k]
                down = torch.randn(4, W.shape[1], generator=g) / W.shape[1] ** 0.5
                up = torch.randn(W.shape[0], 4, generator=g) * 0.5
                m = k[:-len(".weight")]
                d[m + ".lora_down.weight"] = down.requires_grad_()
                d[m + ".lora_up.weight"] = up.requires_grad_()
            return d
        tk = {k: torch.from_numpy(v) for k, v in te.items() if "self_attn" in k and k.endswith("_proj.weight")}
        uk = {k: torch.from_numpy(v) for k, v in un.items()
              if (".attn1." in k or ".attn2." in k) and k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))}
        params = {"new_concept_embedding": emb, "text_encoder": lora(tk), "unet": lora(uk)}
        fn = f"concept_{chr(97 + ci)}.pth"
        torch.save({"params": params}, os.path.join(out_dir, fn))
        entries.append({"lora_path": fn, "unet_alpha": alpha_u, "text_encoder_alpha": alpha_t, "concept_name": " ".join(words)})
    import json
    with open(os.path.join(out_dir, "multi.json"), "w") as f:
        json.dump(entries, f, indent=4)


if __name__ == "__main__" and "--edloras" in sys.argv:
    make_edloras(os.path.join(ROOT, "models/tiny-sd"), os.path.join(ROOT, "tests/data/fuse"),
                 [(["<cat1>", "<cat2>"], 1.0, 1.0), (["<dog1>", "<dog2>"], 0.7, 1.0), (["<owl1>", "<owl2>"], 1.0, 0.8)])
    print("wrote tests/data/fuse/concept_{a,b,c}.pth, multi.json")
