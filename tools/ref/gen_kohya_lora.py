#!/usr/bin/python3
"""kohya / AUTOMATIC1111-webui LoRA files for tests/test_fuse.c (tools/edlora.c read_kohya),
made from tests/data/fuse/concept_a.pth so that they mean the same model change:

  tests/data/fuse/concept_a_kohya.safetensors
      concept_a's text-encoder and UNet LoRA under kohya's key names, with per-module alphas
      (F16 scalars, as kohya saves them in the save dtype): alpha = r/2, 2r, 3 (r = 4: scale
      0.75, not a power of two), 0 (kohya: alpha = r) or no alpha key (old kohya files: alpha =
      r); each module's up matrix is divided by its scale alpha/r, so that kohya's merge
      W + m * (up @ down) * alpha/r equals Mix-of-Show's W + m * up_a @ down_a to float rounding.
      Every third module has rank 5: its last rank-1 term u d^T is split into (u/2) d^T twice
      (ranks then differ between modules of one file and from concept_b's rank 4).
  tests/data/fuse/concept_a_kohya_extra.safetensors
      the same plus modules outside attention that kohya LoRA also trains (CLIPMLP fc1/fc2,
      ff.net.0.proj, ff.net.2, proj_in / proj_out as 1x1 convs with 4-D LoRA tensors), random.
  tests/data/fuse/kohya_extra_golden.safetensors
      for those extra modules: kohya's LoRAInfModule.merge_to in torch float32,
      W + multiplier * (up @ down) * scale (1x1 conv: squeezed), multiplier = 0.9 (text
      encoder) / 0.7 (UNet), the alphas of tests' JSON; keys are the diffusers weight names.

Key names follow kohya-ss sd-scripts networks/lora.py LoRANetwork.create_modules: for every
module of class Transformer2DModel (UNet) and CLIPAttention / CLIPMLP (text encoder), every
Linear / Conv2d child gets lora_name = prefix + "." + name + "." + child_name with '.' -> '_'
(prefix lora_unet / lora_te). The UNet's Transformer2DModel children are enumerated from the
diffusers 0.19.3 model itself (source tree, stubbed as the other scripts do); the text
encoder's modules from its weight names (transformers is not installed; CLIPAttention holds
q/k/v/out_proj, CLIPMLP fc1/fc2).

    /usr/bin/python3 tools/ref/gen_kohya_lora.py [--diffusers /tmp/diffusers-0.19.3/src]
"""
import argparse, importlib, json, os, sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import read_safetensors, write_safetensors, versions, stub_diffusers  # noqa: E402

MODEL = os.path.join(ROOT, "..", "shared", "models", "tiny-sd")
OUT = os.path.join(ROOT, "tests", "data", "fuse")
TE_ALPHA, UNET_ALPHA = 0.9, 0.7


def unet_lora_names(src):
    """kohya create_modules over the diffusers UNet: {lora_name: (module path, class)}."""
    stub_diffusers(src, ["models"])
    UNet = importlib.import_module("diffusers.models.unet_2d_condition").UNet2DConditionModel
    cfg = json.load(open(os.path.join(MODEL, "unet", "config.json")))
    u = UNet(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    out = {}
    for name, module in u.named_modules():
        if module.__class__.__name__ == "Transformer2DModel":
            for child_name, child in module.named_modules():
                # kohya tests the class name "Linear" / "Conv2d" on its own UNet
                # (library/original_unet.py: plain nn.Linear / nn.Conv2d under diffusers'
                # module names); diffusers 0.19.3 has LoRACompatibleLinear / LoRACompatibleConv
                # (subclasses) for ff and proj_in/out, so test the base classes here.
                cls = "Conv2d" if isinstance(child, torch.nn.Conv2d) else "Linear" if isinstance(child, torch.nn.Linear) else None
                if cls:
                    lora_name = ("lora_unet" + "." + name + "." + child_name).replace(".", "_")
                    out[lora_name] = (name + "." + child_name, cls)
    return out


def te_lora_names(te_weights):
    out = {}
    for k in te_weights:
        if k.endswith(".weight") and (".self_attn." in k or ".mlp." in k):
            path = k[:-len(".weight")]
            out[("lora_te" + "." + path).replace(".", "_")] = (path, "Linear")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    args = ap.parse_args()
    torch.manual_seed(0)
    src = torch.load(os.path.join(OUT, "concept_a.pth"))["params"]
    te_w, _ = read_safetensors(os.path.join(MODEL, "text_encoder", "model.safetensors"))
    un_w, _ = read_safetensors(os.path.join(MODEL, "unet", "diffusion_pytorch_model.safetensors"))
    names = {"text_encoder": te_lora_names(te_w), "unet": unet_lora_names(args.diffusers)}
    by_path = {sec: {p: (ln, cls) for ln, (p, cls) in d.items()} for sec, d in names.items()}

    kohya, k = {}, 0
    for sec in ("text_encoder", "unet"):
        for key in src[sec]:
            if not key.endswith(".lora_down.weight"):
                continue
            path = key[:-len(".lora_down.weight")]
            lora_name, _ = by_path[sec][path]          # KeyError: a module kohya would not name
            down = src[sec][key].float().clone()
            up = src[sec][path + ".lora_up.weight"].float().clone()
            r = down.shape[0]
            if k % 3 == 2:                             # rank r + 1, same product
                up = torch.cat([up[:, :-1], up[:, -1:] / 2, up[:, -1:] / 2], 1)
                down = torch.cat([down, down[-1:]], 0)
                r += 1
            alpha = [r / 2, 2 * r, 3.0, 0.0, None][k % 5]
            scale = 1.0 if not alpha else alpha / r
            kohya[lora_name + ".lora_down.weight"] = down
            kohya[lora_name + ".lora_up.weight"] = (up / scale).float()
            if alpha is not None:
                kohya[lora_name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
            # the product kohya merges vs the ED-LoRA one
            ref = src[sec][path + ".lora_up.weight"].double() @ src[sec][key].double()
            got = (kohya[lora_name + ".lora_up.weight"].double() @ down.double()) * scale
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7), lora_name
            k += 1
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "per module",
            "ss_base_model_version": "sd_v1", **versions()}
    write_safetensors(os.path.join(OUT, "concept_a_kohya.safetensors"), kohya, meta)

    # extra modules: MLP / feed-forward / proj_in / proj_out, random, with their kohya merge
    extra, golden = dict(kohya), {}
    picks = [("text_encoder", "text_model.encoder.layers.0.mlp.fc1"), ("text_encoder", "text_model.encoder.layers.1.mlp.fc2"),
             ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
             ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2"),
             ("unet", "mid_block.attentions.0.proj_in"), ("unet", "down_blocks.1.attentions.1.proj_out")]
    for i, (sec, path) in enumerate(picks):
        lora_name, cls = by_path[sec][path]
        W = torch.from_numpy(np.array((te_w if sec == "text_encoder" else un_w)[path + ".weight"], dtype=np.float32))
        r, alpha = 4, [3.0, 8.0][i % 2]
        out_f, in_f = W.shape[0], W.shape[1]
        down = torch.randn(r, in_f) * 0.3
        up = torch.randn(out_f, r) * 0.3
        if cls == "Conv2d":
            assert W.dim() == 4 and W.shape[2:] == (1, 1), path
            down, up = down.reshape(r, in_f, 1, 1), up.reshape(out_f, r, 1, 1)
        extra[lora_name + ".lora_down.weight"] = down
        extra[lora_name + ".lora_up.weight"] = up
        extra[lora_name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
        # LoRAInfModule.merge_to with multiplier = the JSON alpha
        mult, scale = (TE_ALPHA if sec == "text_encoder" else UNET_ALPHA), alpha / r
        if W.dim() == 2:
            merged = W + mult * (up @ down) * scale
        else:
            merged = W + mult * (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
        golden[path + ".weight"] = merged.float()
    write_safetensors(os.path.join(OUT, "concept_a_kohya_extra.safetensors"), extra, meta)
    write_safetensors(os.path.join(OUT, "kohya_extra_golden.safetensors"), golden,
                      {"te_multiplier": str(TE_ALPHA), "unet_multiplier": str(UNET_ALPHA), **versions()})
    print("wrote %d + %d kohya tensors, %d golden weights" % (len(kohya), len(extra) - len(kohya), len(golden)))


if __name__ == "__main__":
    main()
