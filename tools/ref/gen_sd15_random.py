"""Writes a random-weight Stable Diffusion 1.5 diffusers folder (real SD 1.5 configs and
tensor shapes, random values) for memory and speed measurements of `mixshow sample` at
full size. Not a golden: nothing is compared against these numbers.

    /usr/bin/python3 tools/ref/gen_sd15_random.py OUT_DIR [--dtype f32|f16|bf16] [--seed 0]

Inputs: ../shared/models/sd15-configs (configs + diffusers-keys.txt, the key list with
shapes) and ../shared/clip-tokenizer (vocab.json, merges.txt). Output (~4.3 GB in f32,
~2.1 GB in f16/bf16): model_index.json, {unet,vae,text_encoder}/config + *.safetensors,
scheduler/, tokenizer/. Put it under /tmp, never in the repository.

Values: weights of rank >= 2 ~ N(0, (0.5 / sqrt(fan_in))^2) so activations stay O(1)
through 860M random parameters; norm weights 1, biases N(0, 0.01^2). The safetensors file
is streamed one tensor at a time (header first), so the writer needs little memory."""
import json, os, shutil, struct, sys
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared"))


def keys_by_component(path):
    comp = {}
    for line in open(path):
        c, k, s = line.rstrip("\n").split("\t")
        comp.setdefault(c, []).append((k, json.loads(s)))
    return comp


def values(name, shape, rng):
    n = int(np.prod(shape)) if shape else 1
    if len(shape) >= 2:
        fan_in = n // shape[0]
        return rng.standard_normal(n, dtype=np.float32) * np.float32(0.5 / np.sqrt(fan_in))
    if "norm" in name and name.endswith(".weight"):
        return np.ones(n, np.float32)
    return rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)


def to_bytes(v, dtype):
    if dtype == "F32":
        return v.astype("<f4").tobytes()
    if dtype == "F16":
        return v.astype("<f2").tobytes()
    b = v.astype("<f4").view("<u4")            # BF16: round to nearest even
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype("<u2").tobytes()


def write_component(path, tensors, dtype, rng):
    esz = 4 if dtype == "F32" else 2
    header, off = {"__metadata__": {"format": "pt", "generator": "gen_sd15_random.py"}}, 0
    order = sorted(tensors, key=lambda t: t[0].encode())
    for k, s in order:
        nb = int(np.prod(s)) * esz
        header[k] = {"dtype": dtype, "shape": s, "data_offsets": [off, off + nb]}
        off += nb
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k, s in order:
            f.write(to_bytes(values(k, s, rng), dtype))
    os.replace(path + ".tmp", path)
    return off


def main():
    out = sys.argv[1]
    dtype = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else "f32"]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
    cfg = os.path.join(SHARED, "models", "sd15-configs")
    comp = keys_by_component(os.path.join(cfg, "diffusers-keys.txt"))
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(cfg, "model_index.json"), out)
    for sub in ("scheduler", "tokenizer"):
        shutil.copytree(os.path.join(cfg, sub), os.path.join(out, sub), dirs_exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(SHARED, "clip-tokenizer", f), os.path.join(out, "tokenizer"))
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors"}
    for c, fname in files.items():
        os.makedirs(os.path.join(out, c), exist_ok=True)
        shutil.copy(os.path.join(cfg, c, "config.json"), os.path.join(out, c))
        ts = [(k, s) for k, s in comp[c] if not k.endswith("position_ids")]
        nb = write_component(os.path.join(out, c, fname), ts, dtype, rng)
        print(f"{c}: {len(ts)} tensors, {nb / 2**20:.1f} MiB {dtype}", flush=True)


if __name__ == "__main__":
    main()
