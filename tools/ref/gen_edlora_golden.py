#!/usr/bin/python3
"""Golden files for ED-LoRA sampling (tools/edlora.c, ms_txt2img's ED-LoRA fields, `mixshow sample
--edlora`), read by tests/test_edlora.c. Writes tests/data/edlora/:

  edlora_tiny.pth      a small random ED-LoRA for the tiny model, saved as Mix-of-Show saves one:
                       torch.save({'params': delta_state_dict}) with the trainer's dict order and
                       requires_grad=True LoRA tensors (embeddings detached)
  lora_tiny.pth        the same for plain LoRA (enable_edlora false: 1 token per word)
  golden.safetensors   the official pipelines' latents after every step, decoded images, pixels

    ATEN_CPU_CAPABILITY=avx2 is forced (torch.randn kernel of stock x86-64 torch).
    /usr/bin/python3 tools/ref/gen_edlora_golden.py [--diffusers /tmp/diffusers-0.19.3/src]
        [--mos /tmp/mos] [--model models/tiny-sd]
    /usr/bin/python3 tools/ref/gen_edlora_golden.py --check OURS.pth REF.pth
        (torch.load(weights_only=True) of both: same keys in the same order, same values)

What is official here (Mix-of-Show commit 51270fd, imported, not copied):
  convert_edlora (load_new_concept + merge_lora_into_weight), revise_edlora_unet_attention_forward
  (EDLoRA_AttnProcessor: layer i takes context i), and EDLoRAPipeline._encode_prompt with
  bind_concept_prompt, whose source is taken from pipeline_edlora.py and run as is (importing the
  module itself needs diffusers' whole pipeline package, transformers and einops; the one einops
  call, rearrange '(b n) m c -> b n m c', is given by a 3-line equivalent).
  The UNet, VAE and DPMSolverMultistepScheduler are diffusers 0.19.3's modules; the sampling loop
  is EDLoRAPipeline.__call__ transcribed (as gen_pipeline_golden.py does for diffusers' pipeline).
What is not: transformers' source could not be brought here (the repository is larger than the
  fetch limit), so CLIPTextModel and CLIPTokenizer are small torch/python equivalents written for
  this script (same parameter names, so convert_edlora's state_dict merge runs unchanged). Both
  are checked against transformers 4.31 outputs already in the repository before use: the text
  model against pipeline_golden.safetensors dump/text.hidden (HF CLIPTextModel on tiny-sd), the
  tokenizer against every ASCII prompt of clip_tokenizer_golden.json (HF CLIPTokenizer with
  <new0>.. added). The script stops if either differs.
The plain LoRA run follows what the official code does for enable_edlora false
  (StableDiffusionPipeline + convert_edlora): tokens <new0>.. are added, but the prompt is not
  bound, so the concept words are tokenized as ordinary text, with one context for all layers.
  (The official test_edlora.py / train_edlora.py then call pipe.set_new_concept_cfg, which
  StableDiffusionPipeline does not have: that path stops with an AttributeError there.)
"""
import argparse, ast, importlib, json, os, sys, types

os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import read_safetensors, versions, write_safetensors  # noqa: E402

WORDS = ["<cat1>", "<cat2>"]
RUNS = [
    # name, file, enable_edlora, alpha, steps, W, H, prompt, negative, cfg, seed
    ("edlora", "edlora_tiny.pth", True, 0.7, 8, 64, 48, "a photo of <cat1> <cat2> on the beach, <cat1> smiling",
     "blurry, low quality", 7.5, 42),
    ("lora", "lora_tiny.pth", False, 0.6, 6, 48, 64, "a <cat1> <cat2> dog in a garden", None, 5.0, 7),
]


# ---------------------------------------------------------------------------------------------
# CLIP text model + tokenizer (checked against transformers goldens before use)
# ---------------------------------------------------------------------------------------------
def clip_text_model(cfg):
    import torch
    import torch.nn as nn

    class Attn(nn.Module):
        def __init__(s, D, H):
            super().__init__()
            s.H = H
            s.k_proj, s.v_proj, s.q_proj, s.out_proj = (nn.Linear(D, D) for _ in range(4))   # CLIPAttention order

        def forward(s, x):
            B, T, D = x.shape
            dh = D // s.H
            q = s.q_proj(x) * dh ** -0.5
            k, v = s.k_proj(x), s.v_proj(x)
            sp = lambda t: t.view(B, T, s.H, dh).transpose(1, 2)
            w = sp(q) @ sp(k).transpose(-1, -2)
            w = w + torch.full((T, T), torch.finfo(x.dtype).min).triu(1)
            o = torch.softmax(w, -1) @ sp(v)
            return s.out_proj(o.transpose(1, 2).reshape(B, T, D))

    class MLP(nn.Module):
        def __init__(s, D, I):
            super().__init__()
            s.fc1, s.fc2 = nn.Linear(D, I), nn.Linear(I, D)

        def forward(s, x):
            h = s.fc1(x)
            return s.fc2(h * torch.sigmoid(1.702 * h))

    class Layer(nn.Module):
        def __init__(s, D, I, H, eps):
            super().__init__()
            s.self_attn = Attn(D, H)
            s.layer_norm1 = nn.LayerNorm(D, eps=eps)
            s.mlp = MLP(D, I)
            s.layer_norm2 = nn.LayerNorm(D, eps=eps)

        def forward(s, x):
            x = x + s.self_attn(s.layer_norm1(x))
            return x + s.mlp(s.layer_norm2(x))

    class Emb(nn.Module):
        def __init__(s, V, P, D):
            super().__init__()
            s.token_embedding, s.position_embedding = nn.Embedding(V, D), nn.Embedding(P, D)

    class Enc(nn.Module):
        def __init__(s, n, D, I, H, eps):
            super().__init__()
            s.layers = nn.ModuleList([Layer(D, I, H, eps) for _ in range(n)])

    class TextTransformer(nn.Module):
        def __init__(s, c):
            super().__init__()
            D = c["hidden_size"]
            s.embeddings = Emb(c["vocab_size"], c["max_position_embeddings"], D)
            s.encoder = Enc(c["num_hidden_layers"], D, c["intermediate_size"], c["num_attention_heads"], c["layer_norm_eps"])
            s.final_layer_norm = nn.LayerNorm(D, eps=c["layer_norm_eps"])

    class CLIPTextModel(nn.Module):
        def __init__(s, c):
            super().__init__()
            s.text_model = TextTransformer(c)
            s.dtype = torch.float32

        def get_input_embeddings(s):
            return s.text_model.embeddings.token_embedding

        def resize_token_embeddings(s, n):           # PreTrainedModel: copy the old rows, new rows follow
            old = s.text_model.embeddings.token_embedding
            if n == old.num_embeddings:
                return old
            new = nn.Embedding(n, old.embedding_dim)
            new.weight.data[: old.num_embeddings] = old.weight.data
            s.text_model.embeddings.token_embedding = new
            return new

        def forward(s, ids):
            tm = s.text_model
            x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(torch.arange(ids.shape[1]))[None]
            for layer in tm.encoder.layers:
                x = layer(x)
            return (tm.final_layer_norm(x),)

    return CLIPTextModel(cfg)


class ClipTokenizer:
    """CLIPTokenizer (slow, no ftfy) for the prompts used here: whitespace cleanup, lower case,
    CLIP's regex split, byte-level BPE with </w>, added tokens split out first (longest match)."""
    def __init__(self, folder):
        import regex
        self.enc = json.load(open(os.path.join(folder, "vocab.json"), encoding="utf-8"))
        merges = open(os.path.join(folder, "merges.txt"), encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
        self.rank = {tuple(m.split()): i for i, m in enumerate(merges) if m}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b); cs.append(256 + n); n += 1
        self.b2u = dict(zip(bs, map(chr, cs)))
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.added = []
        self.model_max_length = 77

    def __len__(self):
        return len(self.enc) + len(self.added)

    def add_tokens(self, toks):
        n = 0
        for t in toks:
            if t not in self.enc and t not in self.added:
                self.added.append(t); n += 1
        return n

    def convert_tokens_to_ids(self, t):
        return self.enc[t] if t in self.enc else len(self.enc) + self.added.index(t)

    def bpe(self, w):
        word = tuple(w[:-1]) + (w[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.rank.get(p, 1e18))
            if best not in self.rank:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1]); i += 2
                else:
                    out.append(word[i]); i += 1
            word = tuple(out)
        return word

    def encode_text(self, text):
        ids = []
        text = " ".join(text.split()).lower()
        for w in self.pat.findall(text):
            ids += [self.enc[p] for p in self.bpe("".join(self.b2u[b] for b in w.encode("utf-8")))]
        return ids

    def ids(self, text):
        out, i, buf = [], 0, ""
        by_len = sorted(self.added, key=len, reverse=True)
        while i < len(text):
            hit = next((t for t in by_len if text.startswith(t, i)), None)
            if hit:
                out += self.encode_text(buf); buf = ""
                out.append(self.convert_tokens_to_ids(hit)); i += len(hit)
            else:
                buf += text[i]; i += 1
        out += self.encode_text(buf)
        out = [49406] + out[:75] + [49407]
        return out + [49407] * (77 - len(out))

    def __call__(self, texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"):
        import torch
        assert padding == "max_length" and max_length == 77 and truncation
        if isinstance(texts, str):
            texts = [texts]
        return types.SimpleNamespace(input_ids=torch.tensor([self.ids(t) for t in texts], dtype=torch.int64))


def check_clip(te, model_dir):
    """The stand-ins against transformers 4.31 outputs stored in the repository."""
    import torch
    T, _ = read_safetensors(os.path.join(ROOT, "tests", "data", "pipeline_golden.safetensors"))
    ids = torch.from_numpy(np.array(T["dump/in.input_ids"], dtype=np.int64))
    with torch.no_grad():
        got = te(ids)[0].numpy()
    want = np.array(T["dump/text.hidden"], dtype=np.float32)
    err = np.abs(got - want).max()
    assert err < 1e-5, "text model differs from transformers: %g" % err
    g = json.load(open(os.path.join(ROOT, "tests", "data", "clip_tokenizer_golden.json")))
    n = 0
    for si in (0, 1):
        tok = ClipTokenizer(os.path.join(model_dir, "tokenizer"))
        tok.add_tokens(g["added_sets"][si])
        assert [tok.convert_tokens_to_ids(t) for t in g["added_sets"][si]] == g["added_ids"][si]
        for c in g["cases"]:
            p = c["prompt"]
            if c["set"] != si or not p.isascii() or any(ord(ch) < 32 and ch not in "\t\n" for ch in p) or "<|" in p:
                continue
            want = [int(x) for x in c["ids"].split()]
            assert tok.ids(p) == want, (p, tok.ids(p), want)
            n += 1
    return err, n


# ---------------------------------------------------------------------------------------------
def import_all(dsrc, mos):
    from gen_unet_golden import import_unet
    UNet, _ = import_unet(dsrc)
    m = types.ModuleType("diffusers.schedulers"); m.__path__ = [os.path.join(dsrc, "diffusers", "schedulers")]
    sys.modules["diffusers.schedulers"] = m
    dpm = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_multistep").DPMSolverMultistepScheduler
    vae = importlib.import_module("diffusers.models.autoencoder_kl").AutoencoderKL
    sys.path.insert(0, mos)
    conv = importlib.import_module("mixofshow.utils.convert_edlora_to_diffusers")
    edl = importlib.import_module("mixofshow.models.edlora")
    # EDLoRAPipeline._encode_prompt and bind_concept_prompt, from the file's own source
    src = open(os.path.join(mos, "mixofshow", "pipelines", "pipeline_edlora.py")).read()
    tree = ast.parse(src)
    import torch
    from typing import List, Optional

    def rearrange(x, pattern, b):                    # einops, the one pattern used there
        assert pattern == "(b n) m c -> b n m c"
        return x.reshape(b, x.shape[0] // b, x.shape[1], x.shape[2])
    ns = {"torch": torch, "List": List, "Optional": Optional, "rearrange": rearrange}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "bind_concept_prompt":
            exec(compile(ast.Module([node], []), "pipeline_edlora.py", "exec"), ns)
        if isinstance(node, ast.ClassDef) and node.name == "EDLoRAPipeline":
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == "_encode_prompt":
                    exec(compile(ast.Module([f], []), "pipeline_edlora.py", "exec"), ns)
    return UNet, vae, dpm, conv, edl, ns


def build(cls, folder, weights="diffusion_pytorch_model.safetensors"):
    import torch
    cfg = json.load(open(os.path.join(folder, "config.json")))
    model = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sd, _ = read_safetensors(os.path.join(folder, weights))
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}, strict=True)
    return model.eval()


def load_text(model_dir):
    import torch
    cfg = json.load(open(os.path.join(model_dir, "text_encoder", "config.json")))
    te = clip_text_model(cfg)
    sd, _ = read_safetensors(os.path.join(model_dir, "text_encoder", "model.safetensors"))
    missing, unexpected = te.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()},
                                             strict=False)
    assert not missing and all(k.endswith("position_ids") for k in unexpected), (missing, unexpected)
    return te.eval()


def make_delta(te, unet, enable_edlora, g):
    """trainer_edlora.py: LoRA modules found as EDLoRATrainer.__init__ finds them (where
    CLIPAttention / Attention, every Linear child), saved as delta_state_dict does."""
    import torch
    T = 16 if enable_edlora else 1
    D = te.text_model.embeddings.token_embedding.embedding_dim
    d = {"new_concept_embedding": {}, "text_encoder": {}, "unet": {}}
    for w in WORDS:
        d["new_concept_embedding"][w] = torch.randn((T, D), generator=g) * 0.3
    for sec, model, where in (("text_encoder", te, "CLIPAttention"), ("unet", unet, "Attention")):
        for name, module in model.named_modules():
            cls = module.__class__.__name__
            if cls == where or (where == "CLIPAttention" and cls == "Attn"):
                for cname, child in module.named_modules():
                    if child.__class__.__name__ == "Linear":
                        r = 4
                        down = torch.randn((r, child.in_features), generator=g) * (1.0 / child.in_features ** 0.5)
                        up = torch.randn((child.out_features, r), generator=g) * 0.1
                        d[sec][name + "." + cname + ".lora_down.weight"] = down.requires_grad_()
                        d[sec][name + "." + cname + ".lora_up.weight"] = up.requires_grad_()
    return d


def check(ours, ref):
    import torch
    a = torch.load(ours, weights_only=True)
    b = torch.load(ref, weights_only=True)

    def walk(x, y, path):
        assert type(x) is type(y) or (isinstance(x, dict) and isinstance(y, dict)), path
        if isinstance(x, dict):
            assert list(x.keys()) == list(y.keys()), (path, list(x.keys())[:5], list(y.keys())[:5])
            for k in x:
                walk(x[k], y[k], path + "." + k)
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), path
            assert x.requires_grad == y.requires_grad, (path, x.requires_grad, y.requires_grad)
    walk(a, b, "")
    print("same dict, same key order, same values and requires_grad:", ours, ref)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--mos", default="/tmp/mos")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-sd"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "edlora"))
    ap.add_argument("--check", nargs=2, metavar=("OURS", "REF"))
    a = ap.parse_args()
    if a.check:
        return check(*a.check)
    import torch
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    UNet, AutoencoderKL, DPM, conv, edl, ns = import_all(a.diffusers, a.mos)
    vae = build(AutoencoderKL, os.path.join(a.model, "vae"))
    sched_cfg = json.load(open(os.path.join(a.model, "scheduler", "scheduler_config.json")))
    err, ncases = check_clip(load_text(a.model), a.model)
    print("stand-in CLIP text model vs transformers: max abs %.2e; tokenizer: %d prompts equal" % (err, ncases))
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    T, meta_runs = {}, []
    for ri, (name, fname, enable_edlora, alpha, steps, W, H, prompt, negative, cfg, seed) in enumerate(RUNS):
        unet = build(UNet, os.path.join(a.model, "unet"))
        te = load_text(a.model)
        tok = ClipTokenizer(os.path.join(a.model, "tokenizer"))
        g = torch.Generator().manual_seed(1000 + ri)
        delta = make_delta(te, unet, enable_edlora, g)
        path = os.path.join(a.out, fname)
        torch.save({"params": delta}, path)            # train_edlora.py save_and_validation
        pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=te, unet=unet, vae=vae)
        with torch.no_grad():
            pipe, new_concept_cfg = conv.convert_edlora(pipe, torch.load(path), enable_edlora=enable_edlora, alpha=alpha)
        do_cfg = cfg > 1.0
        with torch.no_grad():
            if enable_edlora:                          # EDLoRAPipeline.__init__ / __call__ step 3
                edl.revise_edlora_unet_attention_forward(unet)
                pe = ns["_encode_prompt"](pipe, prompt, new_concept_cfg, "cpu", 1, do_cfg, negative)
                bound = ns["bind_concept_prompt"]([prompt], new_concept_cfg)
            else:                                      # StableDiffusionPipeline._encode_prompt
                pe = te(tok([prompt]).input_ids)[0]
                if do_cfg:
                    pe = torch.cat([te(tok([negative if negative is not None else ""]).input_ids)[0], pe])
                bound = [prompt]
            sched = DPM.from_config(sched_cfg)
            sched.set_timesteps(steps)
            gen = torch.Generator().manual_seed(seed)
            latents = torch.randn((1, unet.config.in_channels, H // vae_scale_factor, W // vae_scale_factor),
                                  generator=gen, dtype=torch.float32) * sched.init_noise_sigma
            traj = []
            for t in sched.timesteps:
                lmi = torch.cat([latents] * 2) if do_cfg else latents
                lmi = sched.scale_model_input(lmi, t)
                noise_pred = unet(lmi, t, encoder_hidden_states=pe).sample
                if do_cfg:
                    u, c = noise_pred.chunk(2)
                    noise_pred = u + cfg * (c - u)
                latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
                traj.append(latents.clone())
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            im = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
            T[name + "/latents"] = torch.stack(traj).numpy()
            T[name + "/image"] = image.numpy()
            T[name + "/u8"] = (im * 255).round().astype("uint8")
            T[name + "/ids"] = tok(bound).input_ids.numpy().astype(np.int64)
            T[name + "/context"] = pe.numpy()
        meta_runs.append(dict(name=name, file=fname, enable_edlora=enable_edlora, alpha=alpha, sampler="dpm", steps=steps,
                              width=W, height=H, prompt=prompt, negative=negative, cfg=cfg, seed=seed,
                              bound=bound, concept_cfg={k: v["concept_token_names"] for k, v in new_concept_cfg.items()}))
    meta = dict(versions(), diffusers="0.19.3", mixofshow="51270fd", aten_cpu_capability=os.environ["ATEN_CPU_CAPABILITY"],
                model="tiny-sd", runs=json.dumps(meta_runs),
                note="CLIP text model and tokenizer: stand-ins checked against transformers 4.31 goldens (see header)")
    n = write_safetensors(os.path.join(a.out, "golden.safetensors"), T, meta)
    print("golden.safetensors", n, "bytes")


if __name__ == "__main__":
    main()
