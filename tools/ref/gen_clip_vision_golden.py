#!/usr/bin/python3
"""Golden files for the CLIP image tower and the projections (models/clip.c "CLIPModel",
tools/clip_model.c; read by tests/test_clip_vision.c), from HF transformers' own CLIPModel and
CLIPImageProcessor run on random weights:

  tests/data/clip_vision/<case>/config.json              CLIPModel config (vision_config, text_config,
                                                         projection_dim), as save_pretrained writes it
  tests/data/clip_vision/<case>/model.safetensors        case a: the weights (safetensors)
  tests/data/clip_vision/<case>/pytorch_model.bin        case b: the weights (torch.save zip pickle)
                                                         (case c: F16 safetensors, real CLIP vocabulary)
  tests/data/clip_vision/<case>/preprocessor_config.json CLIPImageProcessor settings (a: dict sizes as
                                                         4.26+ saves them; b: plain ints, the older form)
  tests/data/clip_vision/<case>/img*.png                 test images (RGB, grey, RGBA; non-square)
  tests/data/clip_vision/<case>/golden.safetensors       pixel_values of CLIPImageProcessor, vision
                                                         hidden_states[0..L], last_hidden_state,
                                                         pooler_output, image_embeds; text input ids,
                                                         last_hidden_state, pooler_output, text_embeds

Case a: vision 64 wide, 4 heads, 3 layers, patch 8 on 32x32, quick_gelu, shortest_edge 32 =
crop 32; text 32 wide, 2 layers; projection 24. Case b: another shape: vision 48 wide, 3 heads
(head dim 16), 2 layers, patch 6 on 30x30, gelu, shortest_edge 34 > crop 30 (a real centre
crop); text 40 wide, 5 heads; projection 20. layer_norm_eps stays 1e-5 (every CLIP checkpoint's):
4.26 builds every LayerNorm with torch's default eps, ignoring the config, where later versions
(and mixshow) use config.layer_norm_eps; at 1e-5 the two agree. Every parameter is random
(LayerNorm weights 1 +- 0.2, biases, class/position embeddings too), so nothing hides behind an
identity init.

    /usr/bin/python3 tools/ref/gen_clip_vision_golden.py --transformers /tmp/tf

Source of transformers: the v4.31 tree is not obtainable here (its repository snapshot exceeds
what may be fetched, and transformers is on no reachable registry). The transformers package
vendored unmodified in github:LoRA-net-team/kohya-trainer-no-accel (commit bfc1dc8, its
transformers/__init__.py says __version__ = "4.26.0") is used:
    git -C <mirror> archive bfc1dc8 transformers | tar -x -C /tmp/tf
(In that copy a search-and-replace changed the word "image" to "zaradress" in docstrings and
messages only: no Python name token differs, checked with tokenize.) What we compare did not change
between 4.26 and 4.31 in modeling_clip.py (vision embeddings, pre_layrnorm, encoder, post_layernorm
of the CLS token, visual/text projections; attention scales q before q k^T in both; LayerNorm eps:
see case b) or in
image_transforms.py (resize through PIL, center_crop, rescale, normalize), except the text pooling:
4.26 takes the row of argmax(input_ids) always; 4.31 does so when eos_token_id == 2 (every
config written before PR #24773) and otherwise the first position of eos_token_id. Both cases
here have eos_token_id 2; tests/test_clip_vision.c checks the other branch by its definition.
The modules are imported from the tree, not copied (gen_clip_golden.import_transformers).
"""
import argparse, importlib, json, os, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import write_safetensors, versions  # noqa: E402

CASES = {
    "a": dict(vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                          patch_size=8, image_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
              text=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_hidden_layers=2, max_position_embeddings=16, hidden_act="quick_gelu"),
              projection_dim=24, size={"shortest_edge": 32}, crop={"height": 32, "width": 32},
              weights="model.safetensors", T=16),
    "b": dict(vision=dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=2,
                          patch_size=6, image_size=30, hidden_act="gelu"),
              text=dict(vocab_size=200, hidden_size=40, intermediate_size=80, num_attention_heads=5,
                        num_hidden_layers=2, max_position_embeddings=20, hidden_act="quick_gelu"),
              projection_dim=20, size=34, crop=30, weights="pytorch_model.bin", T=12),
    "c": dict(vision=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                          patch_size=16, image_size=32),
              text=dict(vocab_size=49408, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                        num_hidden_layers=1, max_position_embeddings=77, pad_token_id=1, bos_token_id=49406,
                        eos_token_id=49407),
              projection_dim=8, size={"shortest_edge": 32}, crop={"height": 32, "width": 32},
              weights="model.safetensors", half=True, T=77),
}
# case c: the real CLIP vocabulary (prompts through CLIPTokenizer, tokenizer files of models/tiny-sd),
# eos_token_id 49407 as configs written after transformers PR #24773 say it, weights stored F16
PROMPTS = ["a photo of a cat", "two red circles on the left of a blue striped square on grass",
           "a red circle above a blue square"]
# (height, width, PIL mode) of the test images
IMAGES = [(37, 45, "RGB"), (32, 32, "RGB"), (50, 20, "RGB"), (40, 64, "L"), (29, 31, "RGBA")]


def randomize(model, torch, g):
    """Every parameter random: matrices N(0, 1/fan_in), LayerNorm weights 1 + 0.2 N, biases and
    embeddings N(0, 0.1^2) / N(0, 0.5^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name == "logit_scale":
                p.copy_(torch.tensor(2.6592))
            elif ("layer_norm" in name or "layrnorm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * n)
            elif name.endswith("bias"):
                p.copy_(0.1 * n)
            elif "embedding" in name:
                p.copy_(0.5 * n)
            else:
                p.copy_(n / np.sqrt(p[0].numel()))


def make_image(rng, h, w, mode):
    from PIL import Image
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 4))
    for c in range(4):
        a, b, ph = rng.uniform(0.05, 0.4, 3)
        img[..., c] = 127 + 90 * np.sin(a * x + b * y + 6 * ph) + rng.normal(0, 25, (h, w))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(img, "RGBA")
    rgb = Image.fromarray(img[..., :3], "RGB")
    return rgb.convert("L") if mode == "L" else rgb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transformers", default="/tmp/tf", help="folder holding transformers/ (see header)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/data/clip_vision"))
    ap.add_argument("--seed", type=int, default=15)
    a = ap.parse_args()
    import torch
    from PIL import Image
    from gen_clip_golden import import_transformers
    tc, mc, cc = import_transformers(a.transformers)
    ip = importlib.import_module("transformers.models.clip.image_processing_clip")
    torch.set_grad_enabled(False)
    for key, case in CASES.items():
        out = os.path.join(a.out, key)
        os.makedirs(out, exist_ok=True)
        cfg = cc.CLIPConfig(text_config=case["text"], vision_config=case["vision"],
                            projection_dim=case["projection_dim"])
        model = mc.CLIPModel(cfg).eval()
        g = torch.Generator().manual_seed(a.seed + ord(key))
        randomize(model, torch, g)
        # config.json as save_pretrained writes it (to_json_string of the config)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(cfg.to_json_string())
        if case.get("half"):             # F16 in the file: compute with the rounded weights
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.half().float())
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if case.get("half"):
            sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        if case["weights"].endswith(".safetensors"):
            write_safetensors(os.path.join(out, case["weights"]), sd)
        else:
            torch.save(sd, os.path.join(out, case["weights"]))
        proc = ip.CLIPImageProcessor(size=case["size"], crop_size=case["crop"])
        pp = {"do_resize": True, "size": case["size"], "resample": 3, "do_center_crop": True,
              "crop_size": case["crop"], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": proc.image_mean, "image_std": proc.image_std, "do_convert_rgb": True,
              "image_processor_type": "CLIPImageProcessor"}
        with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
            json.dump(pp, f, indent=2)
        rng = np.random.default_rng(a.seed + ord(key))
        imgs = []
        for i, (h, w, mode) in enumerate(IMAGES):
            im = make_image(rng, h, w, mode)
            im.save(os.path.join(out, "img%d.png" % i))
            imgs.append(Image.open(os.path.join(out, "img%d.png" % i)))
        pixels = proc(images=imgs, return_tensors="np")["pixel_values"]
        px = torch.from_numpy(pixels)
        vo = model.vision_model(pixel_values=px, output_hidden_states=True)
        image_embeds = model.get_image_features(pixel_values=px)
        # text: BOS-like first id, random ids, then the largest id (CLIP's EOS, the argmax) and padding
        T, V = case["T"], case["text"]["vocab_size"]
        ids = torch.randint(1, V - 1, (3, T), generator=g)
        for b, n in enumerate([5, T - 1, 1]):
            ids[b, n] = V - 1
            ids[b, n + 1:] = V - 1
        if key == "c":
            tok = tc.CLIPTokenizer(os.path.join(ROOT, "models/tiny-sd/tokenizer/vocab.json"),
                                   os.path.join(ROOT, "models/tiny-sd/tokenizer/merges.txt"))
            ids = torch.tensor(tok(PROMPTS, padding="max_length", max_length=T, truncation=True).input_ids)
        to = model.text_model(input_ids=ids, output_hidden_states=False)
        text_embeds = model.get_text_features(input_ids=ids)
        tensors = {"pixel_values": px, "vision.last_hidden_state": vo.last_hidden_state,
                   "vision.pooler_output": vo.pooler_output, "image_embeds": image_embeds,
                   "text.input_ids": ids.to(torch.int64), "text.last_hidden_state": to.last_hidden_state,
                   "text.pooler_output": to.pooler_output, "text_embeds": text_embeds}
        for k, hs in enumerate(vo.hidden_states):
            tensors["vision.hidden_states.%d" % k] = hs
        meta = dict(versions(), transformers="4.26.0 (vendored tree, see gen_clip_vision_golden.py)", prompts=json.dumps(PROMPTS),
                    seed=str(a.seed), case=key, images=json.dumps(IMAGES))
        write_safetensors(os.path.join(out, "golden.safetensors"), tensors, meta)
        print(key, {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("vision.hidden")},
              "files:", sorted((f, os.path.getsize(os.path.join(out, f))) for f in os.listdir(out)))


if __name__ == "__main__":
    main()
