#!/usr/bin/python3
"""Fused folders written by `mixshow fuse`, loaded by diffusers 0.19.3: golden outputs for
tests/test_fuse.c (issue 11, "the fused folder loads in diffusers and its outputs match ours").

    /usr/bin/python3 tools/ref/gen_fuse_load_golden.py --make-model
        tests/data/fuse/model_c/ (a base model with other widths and head counts, see MODEL_C_*)
        and tests/data/fuse/model_c_concepts/ (2 random ED-LoRAs for it + multi.json)
    /usr/bin/python3 tools/ref/gen_fuse_load_golden.py [--mixshow build/f3/mixshow]
        runs `mixshow fuse` for each case of CASES (the arguments test_fuse.c uses), loads the
        fused folder with diffusers' pieces and writes tests/data/fuse/load_golden.safetensors

Loading, as StableDiffusionPipeline.from_pretrained(fused) builds its parts:
  - UNet2DConditionModel.from_pretrained(fused, subfolder="unet") (diffusers 0.19.3 source, run
    as is through common.stub_diffusers; safetensors read by common.read_safetensors);
  - CLIPTextModel.from_pretrained(fused, subfolder="text_encoder") and CLIPTokenizer: the
    transformers 4.31 stand-ins of gen_train_golden.py (install_shims; checked there against what
    real transformers 4.31 wrote). The tokenizer reads tokenizer/added_tokens.json as 4.31's
    from_pretrained does: tokens in id order, each id must be len(tokenizer) when it is added
    ("Non-consecutive added token" otherwise).
Per case <c>: the fused folder's prompts are tokenized (<c>.ids int64 (B,77)), encoded
(<c>.hidden (B,77,D), last_hidden_state) and one UNet step runs on fixed inputs
(<c>.latents (B,4,h,w) from torch.manual_seed(1), <c>.t (B) timesteps, encoder_hidden_states =
<c>.hidden): <c>.eps (B,4,h,w); with the spatial stage also <c>.unet.<key>, the fused attention
weights (attn1/attn2 to_q, to_k, to_v, to_out.0) eps was computed with. The fuse is deterministic
(test_fuse.c checks the folder is bit-identical for 1 and 2 threads), so the C test redoes it and
compares; where the spatial stage makes the fused weights depend on the last bits of our arithmetic,
the UNet step runs on the stored weights.
"""
import argparse, importlib, json, os, subprocess, shutil, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import read_safetensors, versions, write_safetensors  # noqa: E402

TINY = os.path.join(ROOT, "models", "tiny-sd")
FUSE = os.path.join(ROOT, "tests", "data", "fuse")
MODEL_C = os.path.join(FUSE, "model_c")
CONCEPTS_C = os.path.join(FUSE, "model_c_concepts")
OUT = os.path.join(FUSE, "load_golden.safetensors")

# model_c: SD 1.x topology, other widths everywhere. Text encoder 20 wide with 4 heads (head
# width 5), 3 layers, MLP 56; UNet 16/32/48/48 channels, heads 2/4/3/2 (diffusers 0.19.3's
# attention_head_dim = heads: head widths 8/8/16/24), one layer per block, cross-attention 20.
MODEL_C_TEXT = dict(hidden_size=20, intermediate_size=56, num_attention_heads=4, num_hidden_layers=3, projection_dim=20)
MODEL_C_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32, 48, 48],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=8, cross_attention_dim=20, attention_head_dim=[2, 4, 3, 2])

# model_c's ED-LoRAs have 10 tokens per word, one per cross-attention layer of its UNet (the
# official trainer always makes 16 and uses the first 10 there; mixshow fuse wants one per layer).
# (name, mixshow fuse arguments relative to the repository root, prompts). The same runs are in
# tests/test_fuse_load.c (test_golden_and_ldm). tiny without the spatial stage: gram's spatial
# weights on the tiny model reach 600-2400x |W0| (few recorded rows per input width), which
# amplifies float rounding past the 1e-5 comparison in both implementations alike.
CASES = [
    ("tiny", ["--model", "models/tiny-sd", "--concepts", "tests/data/fuse/multi2.json", "--spatial-size", "16",
              "--spatial-steps", "4", "--textenc-iters", "60", "--unet-iters", "20", "--no-spatial"],
     ["a <new0> <new16> and a <new35><new51> on grass", "<new15>, <new31> photo of a dog"]),
    ("c", ["--model", "tests/data/fuse/model_c", "--concepts", "tests/data/fuse/model_c_concepts/multi.json",
           "--spatial-size", "16", "--spatial-steps", "4", "--textenc-iters", "60", "--unet-iters", "20"],
     ["photo of <new3> <new13> beside <new24> <new38>", "<new9><new19><new29><new39>"]),
]
T_STEP = [999, 21]


def make_model():
    import gen_train_golden as gt
    import gen_fuse_golden as gf
    import torch
    gt.install_shims(A.mos, A.diffusers)
    un = sys.modules["diffusers.models.unet_2d_condition"]
    torch.manual_seed(2468)
    unet = un.UNet2DConditionModel(**MODEL_C_UNET)
    tc = json.load(open(os.path.join(TINY, "text_encoder", "config.json")))
    tc.update(MODEL_C_TEXT)
    tc["_name_or_path"] = "mixshow/model_c-random-clip-text"
    te = gt.make_clip_classes()(tc)
    with torch.no_grad():          # defaults leave LayerNorms at 1/0 and tiny outputs: spread them
        for n, p in list(unet.named_parameters()) + list(te.named_parameters()):
            if p.dim() >= 2 and "embedding" not in n:
                p.mul_(1.5)
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        te.text_model.embeddings.token_embedding.weight.mul_(0.05)
        te.text_model.embeddings.position_embedding.weight.mul_(0.05)
    for sub in ["unet", "text_encoder"]:
        os.makedirs(os.path.join(MODEL_C, sub), exist_ok=True)
    unet.save_config(os.path.join(MODEL_C, "unet"))
    meta = {"format": "pt", "generator": "tools/ref/gen_fuse_load_golden.py --make-model (torch.manual_seed(2468), "
            "default init, weights of dim >= 2 x 1.5, 1-d + 0.1 N(0,1), embeddings x 0.05)"}
    write_safetensors(os.path.join(MODEL_C, "unet", "diffusion_pytorch_model.safetensors"),
                      {k: v.detach().float().contiguous() for k, v in unet.state_dict().items()}, meta)
    write_safetensors(os.path.join(MODEL_C, "text_encoder", "model.safetensors"),
                      {k: v.detach().float().contiguous() for k, v in te.state_dict().items() if "position_ids" not in k}, meta)
    json.dump(tc, open(os.path.join(MODEL_C, "text_encoder", "config.json"), "w"), indent=2)
    for part in ["vae", "tokenizer", "scheduler"]:
        link = os.path.join(MODEL_C, part)
        if not os.path.islink(link):
            os.symlink(os.path.relpath(os.path.join(TINY, part), MODEL_C), link)
    shutil.copy(os.path.join(TINY, "model_index.json"), os.path.join(MODEL_C, "model_index.json"))
    os.makedirs(CONCEPTS_C, exist_ok=True)
    gf.make_edloras(MODEL_C, CONCEPTS_C, [(["<cat1>", "<cat2>"], 1.0, 1.0), (["<dog1>", "<dog2>"], 0.7, 0.9)], seed=13,
                    tokens=10)   # one per cross-attention layer: down 3, mid 1, up 6
    print("wrote %s and %s" % (MODEL_C, CONCEPTS_C))


def load_tokenizer(gt, folder):
    """gen_train_golden's 4.31 stand-in + tokenizer/added_tokens.json as 4.31 reads it."""
    tok = gt.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    p = os.path.join(folder, "tokenizer", "added_tokens.json")
    if os.path.exists(p):
        for t, i in sorted(json.load(open(p, encoding="utf-8")).items(), key=lambda x: x[1]):
            if i != len(tok):
                raise ValueError("Non-consecutive added token '%s' found. Should have index %d but has index %d "
                                 "in saved vocabulary." % (t, len(tok), i))
            tok.add_tokens([t])
    return tok


def main():
    import gen_train_golden as gt
    import torch
    _, CLIPTextModel = gt.install_shims(A.mos, A.diffusers)
    gt.check_clip_shim(CLIPTextModel)
    un = sys.modules["diffusers.models.unet_2d_condition"]
    torch.set_num_threads(1)
    out, meta = {}, dict(versions(), diffusers="0.19.3 (source)", transformers="4.31 stand-ins of gen_train_golden.py")
    for name, args, prompts in CASES:
        folder = "/tmp/mixshow_fuse_load_%s" % name
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [os.path.abspath(A.mixshow), "fuse"] + args + ["--out", folder]
        subprocess.run(cmd, cwd=ROOT, check=True)
        tok = load_tokenizer(gt, folder)
        te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        unet = un.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        assert te.text_model.embeddings.token_embedding.weight.shape[0] == len(tok)
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = te(ids)[0]
            torch.manual_seed(1)
            B, c = len(prompts), unet.config
            lat = torch.randn(B, c.in_channels, c.sample_size, c.sample_size)
            t = torch.tensor(T_STEP[:B], dtype=torch.int64)
            eps = unet(lat, t, encoder_hidden_states=hidden).sample
        out.update({name + ".ids": ids.to(torch.int64), name + ".hidden": hidden, name + ".latents": lat,
                    name + ".t": t, name + ".eps": eps})
        if "--no-spatial" not in args:
            # the fused attention weights eps was computed with: gram's spatial stage is ill-conditioned
            # (a last-bit change of the recorded features moves them), so test_fuse_load.c runs its UNet
            # step on these and compares the fusion itself by its objectives
            for k, v in unet.state_dict().items():
                if (".attn1.to_" in k or ".attn2.to_" in k) and k.endswith(".weight"):
                    out[name + ".unet." + k] = v.detach().clone()
        meta[name + ".fuse"] = " ".join(["mixshow", "fuse"] + args)
        meta[name + ".prompts"] = json.dumps(prompts)
        new = sum(1 for i in ids.flatten().tolist() if i >= 49408)
        print("%s: %d new-token ids in %d prompts; |hidden| %.4f |eps| %.4f" % (name, new, B, hidden.norm(), eps.norm()))
        shutil.rmtree(folder, ignore_errors=True)
    n = write_safetensors(OUT, out, meta)
    print("wrote %s (%d bytes)" % (OUT, n))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-model", action="store_true")
    ap.add_argument("--mixshow", default=os.path.join(ROOT, "build", "mixshow"))
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--mos", default="/tmp/mos")
    A = ap.parse_args()
    if A.make_model:
        make_model()
    else:
        main()
