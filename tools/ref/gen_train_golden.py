#!/usr/bin/python3
"""Golden replay dumps and traces for `mixshow train --replay DUMP --trace OUT` (issue 10), made by
the OFFICIAL Mix-of-Show trainer code (commit 51270fd, unpacked at --mos):

    /usr/bin/python3 tools/ref/gen_train_golden.py [--mos /tmp/mos] [--diffusers /tmp/diffusers-0.19.3/src]
                                                   [--cases a,b,c,d,e,f]

writes tests/data/train_golden/<case>.dump.safetensors and <case>.trace.safetensors for each case
and tests/data/train_golden/model_b/unet/ (the second, other-widths UNet of case f).

What runs unchanged (imported, never copied): mixofshow/pipelines/trainer_edlora.py EDLoRATrainer
(model loading, init_new_concept, set_finetune_cfg, forward, cal_attn_reg), models/edlora.py
(LoRALinearLayer, the attention processors), utils/ptp_util.py AttentionStore,
pipelines/pipeline_edlora.py bind_concept_prompt; diffusers 0.19.3 AutoencoderKL,
UNet2DConditionModel, DDPMScheduler, optimization.get_scheduler, attention_processor.
train_edlora.py's loop is re-implemented here statement for statement (it needs accelerate: single
process, gradient_accumulation_steps 1, mixed_precision 'no' i.e. float32 CPU, so
accelerator.backward = loss.backward(), accumulate/sync_gradients are no-ops/True).

Shims (for imports that are not needed or not installable here; none changes a computed value):
  - accelerate.logging.get_logger -> logging; IPython.display; safetensors.torch.load_file (read
    with common.read_safetensors; diffusers' loader then behaves as with safetensors installed);
  - einops.rearrange for the only two patterns the trainer uses, '(b n) m c -> b n m c' and
    '(b l) n -> b l n' (python3-einops is not in Debian 12): exactly a view/reshape;
  - transformers: the 4.31 source could not be brought to this machine (the repository snapshot
    is over the fetch size limit and only a recent version of modeling_clip.py is indexed), so
    `transformers.CLIPTextModel` / `CLIPTokenizer` are small re-implementations of the 4.31 slow
    tokenizer (no ftfy: BasicTokenizer path) and of the 4.31 eager CLIPTextModel (same op order,
    same module names and class names CLIPEncoderLayer/CLIPAttention/CLIPMLP that set_finetune_cfg
    matches, resize_token_embeddings building a new nn.Embedding as 4.31 does). They are CHECKED
    on every run against the goldens that real transformers 4.31 wrote
    (tests/data/clip_golden.safetensors: output and gradients of new rows and LoRA, which must agree
    to 2e-6 relative; tests/data/clip_tokenizer_golden.json: every ASCII case must be identical).
  - diffusers Attention.get_attention_scores' torch.baddbmm(torch.empty(..), beta=0): given zeros
    (same value by definition; torch 1.13 here leaked NaN from uninitialised memory, see
    gen_unet_golden.py).

Randomness is recorded, not replaced: torch.randn / randn_like / randint and diffusers'
randn_tensor (the VAE posterior sample) are wrapped to call the real function and keep a copy of
its output in call order; these become the DUMP's draw tensors. Images, masks and prompts are
synthetic inputs handed to the trainer's forward as the data loader would hand them.
"""
import argparse, copy, importlib, json, logging, math, os, re, sys, types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import read_safetensors, write_safetensors, stub_diffusers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "models", "tiny-sd")
OUT = os.path.join(ROOT, "tests", "data", "train_golden")

torch = None
F = None


# ---------------------------------------------------------------------------------------------
# Shims
# ---------------------------------------------------------------------------------------------
def rearrange(t, pattern, **axes):
    """einops.rearrange for the patterns Mix-of-Show's trainer uses (first axis split in two)."""
    if pattern == "(b n) m c -> b n m c" or pattern == "(b l) n -> b l n":
        b = axes["b"]
        return t.reshape((b, t.shape[0] // b) + tuple(t.shape[1:]))
    raise NotImplementedError("rearrange shim: pattern %r" % pattern)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class CLIPTokenizer:
    """transformers 4.31 slow CLIPTokenizer as Mix-of-Show uses it (no ftfy; ASCII prompts)."""
    model_max_length = 77

    @classmethod
    def from_pretrained(cls, path, subfolder=""):
        return cls(os.path.join(path, subfolder))

    def __init__(self, folder):
        import regex
        self.encoder = json.load(open(os.path.join(folder, "vocab.json"), encoding="utf-8"))
        merges = open(os.path.join(folder, "merges.txt"), encoding="utf-8").read().strip().split("\n")[1:49152 - 256 - 2 + 1]
        self.bpe_ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.added = {}                      # token -> id
        self.vocab_size = len(self.encoder)
        self.bos, self.eos = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.pad = self.eos

    def __len__(self):
        return self.vocab_size + len(self.added)

    def add_tokens(self, toks):
        n = 0
        for t in toks:
            if t not in self.encoder and t not in self.added:
                self.added[t] = len(self); n += 1
        return n

    def convert_tokens_to_ids(self, t):
        return self.added[t] if t in self.added else self.encoder.get(t, self.eos)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(zip(word[:-1], word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:]); break
                new_word.extend(word[i:j]); i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second); i += 2
                else:
                    new_word.append(word[i]); i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(zip(word[:-1], word[1:]))
        out = " ".join(word)
        self.cache[token] = out
        return out

    def _tokenize_chunk(self, text):
        # BasicTokenizer(do_lower_case, strip_accents=False, no punctuation split) for ASCII text
        assert all(ord(c) < 128 for c in text), "tokenizer shim: ASCII prompts only"
        text = " ".join(w.lower() for w in text.split())
        toks = []
        for tok in self.pat.findall(text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            toks.extend(self.bpe(tok).split(" "))
        return toks

    def tokenize(self, text):
        specials = ["<|startoftext|>", "<|endoftext|>"] + list(self.added)
        out, i, start = [], 0, 0
        while i < len(text):            # leftmost-longest split on added/special tokens (Trie.split)
            m = max((s for s in specials if text.startswith(s, i)), key=len, default=None)
            if m is None:
                i += 1; continue
            out += self._tokenize_chunk(text[start:i]); out.append(m)
            i += len(m); start = i
        out += self._tokenize_chunk(text[start:])
        return out

    def encode(self, text, add_special_tokens=True):
        ids = [self.convert_tokens_to_ids(t) for t in self.tokenize(text)]
        return [self.bos] + ids + [self.eos] if add_special_tokens else ids

    def __call__(self, prompts, padding=None, max_length=None, truncation=False, return_tensors=None):
        single = isinstance(prompts, str)
        rows = []
        for p in ([prompts] if single else prompts):
            ids = self.encode(p, add_special_tokens=False)
            if truncation:
                ids = ids[:max_length - 2]
            ids = [self.bos] + ids + [self.eos]
            if padding == "max_length":
                ids = ids + [self.pad] * (max_length - len(ids))
            rows.append(ids)
        ids = torch.tensor(rows, dtype=torch.int64) if return_tensors == "pt" else (rows[0] if single else rows)
        return types.SimpleNamespace(input_ids=ids)


def make_clip_classes():
    nn = torch.nn

    class CLIPTextEmbeddings(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.token_embedding = nn.Embedding(c["vocab_size"], c["hidden_size"])
            self.position_embedding = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
            self.register_buffer("position_ids", torch.arange(c["max_position_embeddings"]).expand((1, -1)))

        def forward(self, input_ids):
            seq_length = input_ids.shape[-1]
            position_ids = self.position_ids[:, :seq_length]
            inputs_embeds = self.token_embedding(input_ids)
            position_embeds = self.position_embedding(position_ids)
            return inputs_embeds + position_embeds

    class CLIPAttention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.embed_dim = c["hidden_size"]
            self.num_heads = c["num_attention_heads"]
            self.head_dim = self.embed_dim // self.num_heads
            self.scale = self.head_dim ** -0.5
            self.dropout = c["attention_dropout"]
            self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
            self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
            self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
            self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

        def _shape(self, tensor, seq_len, bsz):
            return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

        def forward(self, hidden_states, causal_attention_mask):
            bsz, tgt_len, embed_dim = hidden_states.size()
            query_states = self.q_proj(hidden_states) * self.scale
            key_states = self._shape(self.k_proj(hidden_states), -1, bsz)
            value_states = self._shape(self.v_proj(hidden_states), -1, bsz)
            proj_shape = (bsz * self.num_heads, -1, self.head_dim)
            query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)
            key_states = key_states.view(*proj_shape)
            value_states = value_states.view(*proj_shape)
            src_len = key_states.size(1)
            attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
            attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + causal_attention_mask
            attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
            attn_weights = nn.functional.softmax(attn_weights, dim=-1)
            attn_probs = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
            attn_output = torch.bmm(attn_probs, value_states)
            attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim)
            attn_output = attn_output.transpose(1, 2)
            attn_output = attn_output.reshape(bsz, tgt_len, embed_dim)
            return self.out_proj(attn_output)

    class CLIPMLP(nn.Module):
        def __init__(self, c):
            super().__init__()
            assert c["hidden_act"] == "quick_gelu"
            self.fc1 = nn.Linear(c["hidden_size"], c["intermediate_size"])
            self.fc2 = nn.Linear(c["intermediate_size"], c["hidden_size"])

        def forward(self, h):
            h = self.fc1(h)
            h = h * torch.sigmoid(1.702 * h)
            return self.fc2(h)

    class CLIPEncoderLayer(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.self_attn = CLIPAttention(c)
            self.layer_norm1 = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])
            self.mlp = CLIPMLP(c)
            self.layer_norm2 = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

        def forward(self, h, mask):
            residual = h
            h = self.layer_norm1(h)
            h = self.self_attn(h, mask)
            h = residual + h
            residual = h
            h = self.layer_norm2(h)
            h = self.mlp(h)
            return residual + h

    class CLIPEncoder(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.layers = nn.ModuleList([CLIPEncoderLayer(c) for _ in range(c["num_hidden_layers"])])

    class CLIPTextTransformer(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.embeddings = CLIPTextEmbeddings(c)
            self.encoder = CLIPEncoder(c)
            self.final_layer_norm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

        def forward(self, input_ids):
            bsz, seq_len = input_ids.shape
            h = self.embeddings(input_ids)
            # _make_causal_mask (4.31): finfo.min above the diagonal, 0 elsewhere
            mask = torch.full((seq_len, seq_len), torch.tensor(torch.finfo(h.dtype).min))
            cond = torch.arange(mask.size(-1))
            mask.masked_fill_(cond < (cond + 1).view(mask.size(-1), 1), 0)
            mask = mask.to(h.dtype)[None, None, :, :].expand(bsz, 1, seq_len, seq_len)
            for layer in self.encoder.layers:
                h = layer(h, mask)
            return self.final_layer_norm(h)

    class CLIPTextModel(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = dict(c)
            self.text_model = CLIPTextTransformer(c)

        @classmethod
        def from_pretrained(cls, path, subfolder=""):
            folder = os.path.join(path, subfolder)
            c = json.load(open(os.path.join(folder, "config.json")))
            m = cls(c)
            st = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(os.path.join(folder, "model.safetensors"))[0].items()}
            missing, unexpected = m.load_state_dict(st, strict=False)
            assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
            return m.eval()

        def get_input_embeddings(self):
            return self.text_model.embeddings.token_embedding

        def resize_token_embeddings(self, n):
            # 4.31 _get_resized_embeddings: a new nn.Embedding (its default normal_ init runs),
            # _init_weights(new) (a no-op for a bare nn.Embedding in CLIP), copy the old rows
            old = self.get_input_embeddings()
            if n == old.weight.shape[0]:
                return old
            new = nn.Embedding(n, old.weight.shape[1], device=old.weight.device, dtype=old.weight.dtype)
            k = min(n, old.weight.shape[0])
            new.weight.data[:k, :] = old.weight.data[:k, :]
            self.text_model.embeddings.token_embedding = new
            self.config["vocab_size"] = n
            return new

        def forward(self, input_ids):
            return (self.text_model(input_ids),)

    return CLIPTextModel


def install_shims(mos, dsrc):
    import torch as _t
    global torch, F
    torch = _t
    F = torch.nn.functional

    def mod(name, **attrs):
        m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m
        return m
    stub_diffusers(dsrc, ["models", "schedulers", "pipelines"])
    iu = importlib.import_module("diffusers.utils.import_utils")   # (before any stub below exists:
    assert not iu.is_xformers_available()                         #  accelerate stays unavailable to it)
    assert not iu.is_accelerate_available()
    iu._safetensors_available = True
    mod("safetensors").torch = mod("safetensors.torch", load_file=lambda f, device="cpu": {
        k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(f)[0].items()})
    ak = importlib.import_module("diffusers.models.autoencoder_kl")
    un = importlib.import_module("diffusers.models.unet_2d_condition")
    ap = importlib.import_module("diffusers.models.attention_processor")
    dd = importlib.import_module("diffusers.schedulers.scheduling_ddpm")
    su = importlib.import_module("diffusers.schedulers.scheduling_utils")
    importlib.import_module("diffusers.optimization")

    class ZeroEmpty:
        def __getattr__(self, name): return getattr(torch, name)
        @staticmethod
        def empty(*a, **k): return torch.zeros(*a, **k)
    ap.torch = ZeroEmpty()
    d = sys.modules["diffusers"]
    d.AutoencoderKL, d.UNet2DConditionModel, d.DDPMScheduler = ak.AutoencoderKL, un.UNet2DConditionModel, dd.DDPMScheduler
    d.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})        # pipeline_edlora's base class; unused
    d.DPMSolverMultistepScheduler = type("DPMSolverMultistepScheduler", (), {})
    dm = sys.modules["diffusers.models"]
    dm.AutoencoderKL, dm.UNet2DConditionModel = ak.AutoencoderKL, un.UNet2DConditionModel
    sys.modules["diffusers.schedulers"].KarrasDiffusionSchedulers = su.KarrasDiffusionSchedulers
    mod("diffusers.pipelines.stable_diffusion", StableDiffusionPipelineOutput=type("StableDiffusionPipelineOutput", (), {}))
    mod("accelerate"); mod("accelerate.logging", get_logger=lambda name, log_level=None: logging.getLogger(name))
    mod("IPython"); mod("IPython.display", display=lambda *a, **k: None)
    mod("einops", rearrange=rearrange)
    CLIPTextModel = make_clip_classes()
    mod("transformers", CLIPTextModel=CLIPTextModel, CLIPTokenizer=CLIPTokenizer, __version__="4.31.0-shim")
    sys.path.insert(0, mos)
    te = importlib.import_module("mixofshow.pipelines.trainer_edlora")
    return te, CLIPTextModel


def check_clip_shim(CLIPTextModel):
    """The transformers shim against what real transformers 4.31 wrote (gen_clip_golden.py)."""
    import gen_clip_golden as gcg
    g, _ = read_safetensors(os.path.join(ROOT, "tests", "data", "clip_golden.safetensors"))
    m = CLIPTextModel.from_pretrained(TINY, "text_encoder")
    V = m.config["vocab_size"]
    new = torch.from_numpy(np.array(g["tiny.new_emb"]))
    m.resize_token_embeddings(V + new.shape[0])
    emb = m.get_input_embeddings().weight
    with torch.no_grad():
        emb[V:] = new
    for p in m.parameters():
        p.requires_grad_(False)
    emb.requires_grad_(True)
    lora = {}
    for l, layer in enumerate(m.text_model.encoder.layers):
        for pn in ["q_proj", "k_proj", "v_proj", "out_proj"]:
            lin = getattr(layer.self_attn, pn)
            key = "text_model.encoder.layers.%d.self_attn.%s" % (l, pn)
            down = torch.nn.Parameter(torch.from_numpy(np.array(g["tiny.lora." + key + ".lora_down.weight"])))
            up = torch.nn.Parameter(torch.from_numpy(np.array(g["tiny.lora." + key + ".lora_up.weight"])))
            lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"] = down, up
            lin.forward = (lambda orig, down, up: lambda x: orig(x) + 0.75 * F.linear(F.linear(x, down), up))(lin.forward, down, up)
    hs = m(torch.from_numpy(np.array(g["tiny.ids"])).long())[0]
    R = torch.from_numpy(gcg.gen_value("tiny.tiny.R", tuple(hs.shape)))  # (gen_clip_golden: prefix twice)
    (R.double() * hs.double()).sum().backward()

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    worst = {"out": rel(hs.detach().numpy(), g["tiny.out"]), "d_new_emb": rel(emb.grad[V:].numpy(), g["tiny.d_new_emb"])}
    worst["d_lora"] = max(rel(p.grad.numpy(), g["tiny.d_lora." + k]) for k, p in lora.items())
    assert all(v < 2e-6 for v in worst.values()), worst
    # tokenizer: every ASCII case of the added-token sets 0 and 1
    tj = json.load(open(os.path.join(ROOT, "tests", "data", "clip_tokenizer_golden.json"), encoding="utf-8"))
    toks = []
    for s in tj["added_sets"][:2]:
        t = CLIPTokenizer.from_pretrained(TINY, "tokenizer"); t.add_tokens(s); toks.append(t)
    n = bad = 0
    for c in tj["cases"]:
        if c["set"] < 2 and all(32 <= ord(ch) < 127 for ch in c["prompt"]):
            n += 1
            ids = toks[c["set"]](c["prompt"], padding="max_length", max_length=77, truncation=True).input_ids
            if " ".join(map(str, ids)) != c["ids"]:
                bad += 1
                print("tokenizer shim differs:", repr(c["prompt"][:80]))
    assert bad == 0 and n > 300, (n, bad)
    print("transformers shim vs 4.31 goldens: %s; tokenizer %d ASCII cases identical" % (
        ", ".join("%s %.1e" % kv for kv in worst.items()), n))


# ---------------------------------------------------------------------------------------------
# Recording the trainer's random draws (the real functions run; their outputs are copied)
# ---------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.log = []      # (kind, copy of the output, the live output tensor)
        self.depth = 0
        self.replay = None   # list of (kind, tensor) to hand out instead of fresh draws

    def install(self):
        real = {n: getattr(torch, n) for n in ["randn", "randn_like", "randint"]}
        vae = sys.modules["diffusers.models.vae"]
        real_rt = vae.randn_tensor

        def wrap(kind, f):
            def g(*a, **k):
                out = f(*a, **k)
                if self.depth == 0 and self.replay is not None:      # --verify: the dump's draw instead
                    want_kind, t = self.replay.pop(0)
                    assert want_kind == kind and t.shape == out.shape and t.dtype == out.dtype, (kind, want_kind)
                    out = t.clone()
                if self.depth == 0:
                    self.log.append((kind, out.detach().clone(), out))
                return out
            return g
        for n, f in real.items():
            setattr(torch, n, wrap(n, f))

        def rt(*a, **k):
            self.depth += 1
            try:
                out = real_rt(*a, **k)
            finally:
                self.depth -= 1
            if self.replay is not None:
                want_kind, t = self.replay.pop(0)
                assert want_kind == "vae_eps" and t.shape == out.shape, want_kind
                out = t.clone()
            self.log.append(("vae_eps", out.detach().clone(), out))
            return out
        vae.randn_tensor = rt

    def take(self):
        log, self.log = self.log, []
        return log


def synth_batch(rng, B, H, W, prompts, mask_kinds):
    """Images as the loader hands them (ToTensor then Normalize(0.5, 0.5) of a uint8 picture that
    is a small random image nearest-upscaled: compressible); masks at latent resolution."""
    blk = 16 if H >= 256 else 8
    u8 = rng.randint(0, 256, size=(B, 3, H // blk, W // blk)).astype(np.uint8)
    u8 = u8.repeat(blk, axis=2).repeat(blk, axis=3)
    img = torch.from_numpy(u8).float().div(255)          # ToTensor
    img = img.sub_(0.5).div_(0.5)                        # Normalize(mean 0.5, std 0.5)
    h, w = H // 8, W // 8
    masks = np.zeros((B, 1, h, w), np.float64)
    img_masks = np.ones((B, 1, h, w), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    for b, kind in enumerate(mask_kinds):
        if kind == "ones":
            masks[b, 0] = 1
        else:                                             # a blob: union of 3 random ellipses
            for _ in range(3):
                cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
                ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
                masks[b, 0][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
            top, left = rng.randint(0, h // 4 + 1), rng.randint(0, w // 4 + 1)   # padded border
            img_masks[b, 0] = 0
            img_masks[b, 0, top:h - rng.randint(0, h // 4 + 1), left:w - rng.randint(0, w // 4 + 1)] = 1
    return img, torch.from_numpy(masks), torch.from_numpy(img_masks), list(prompts)


def finetune_cfg(lr_scale=1.0, embedding=True):
    return {
        "text_embedding": {"enable_tuning": embedding, "lr": 1e-3 * lr_scale},
        "text_encoder": {"enable_tuning": True, "lora_cfg": {"rank": 4, "alpha": 1.0, "where": "CLIPAttention"},
                         "lr": 1e-5 * lr_scale},
        "unet": {"enable_tuning": True, "lora_cfg": {"rank": 4, "alpha": 1.0, "where": "Attention"},
                 "lr": 1e-4 * lr_scale},
    }


def base_opt(**models):
    m = {"pretrained_path": TINY, "enable_edlora": True, "finetune_cfg": finetune_cfg(),
         "new_concept_token": "<potter1>+<potter2>", "initializer_token": "<rand-0.013>+man",
         "noise_offset": 0.01, "attn_reg_weight": 0.01, "reg_full_identity": False, "use_mask_loss": True,
         "gradient_checkpoint": False, "enable_xformers": False}
    m.update(models)
    return {"manual_seed": 0, "mixed_precision": "no", "gradient_accumulation_steps": 1, "models": m,
            "train": {"optim_g": {"type": "AdamW", "lr": 0.0, "weight_decay": 0.01, "betas": [0.9, 0.999]},
                      "unet_kv_drop_rate": 0, "scheduler": "linear", "emb_norm_threshold": 5.5e-1}}


ED_PROMPTS = ["a photo of <potter1> <potter2>", "<potter1> <potter2> standing near a lake, 4k",
              "a portrait of <potter1> <potter2> in the forest", "<potter1> <potter2>, high quality",
              "a close up of <potter1> <potter2> wearing a hat, smiling"]
LORA_PROMPTS = [p.replace("<potter1> <potter2>", "<new0> <new1>") for p in ED_PROMPTS]



def run_case(te, rec, name, opt, B, H, S, total_iter, mask_plan, data_seed, torch_seed, prompts, out_dir, replay=None):
    """Build the official EDLoRATrainer and run train_edlora.py's loop for S steps on synthetic
    batches; write <name>.dump.safetensors (inputs + draws) and <name>.trace.safetensors."""
    import diffusers.optimization as dopt
    torch.manual_seed(torch_seed)
    rng = np.random.RandomState(data_seed)
    opt = copy.deepcopy(opt)
    opt_json = json.dumps(opt)                                   # before set_finetune_cfg pops 'where'
    rec.take()
    # --- train_edlora.py: model, optimizer (statement order as in train()) ---
    trainer = te.EDLoRATrainer(**copy.deepcopy(opt["models"]))
    init_log = rec.take()
    assert [k for k, _, _ in init_log] == ["randn_like"] * sum(
        t.startswith("<rand") for t in opt["models"]["initializer_token"].split("+")), init_log
    train_opt = opt["train"]
    optim_type = train_opt["optim_g"].pop("type")
    assert optim_type == "AdamW"
    optimizer = torch.optim.AdamW(trainer.get_params_to_optimize(), **train_opt["optim_g"])
    lr_scheduler = dopt.get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0,
                                      num_training_steps=total_iter * opt["gradient_accumulation_steps"])
    stop_emb_update = False
    original_embedding = copy.deepcopy(trainer.text_encoder.get_input_embeddings().weight)

    # parameter naming (issue 10)
    ids = trainer.get_all_concept_token_ids()
    tuning = opt["models"]["finetune_cfg"]

    def params(which):
        out = {}
        emb = trainer.text_encoder.get_input_embeddings().weight
        if tuning["text_embedding"]["enable_tuning"]:
            t = emb.grad if which == "grad" else emb
            out["token_embedding.concept"] = t[ids].detach().clone()
        for prefix, mods in [("text_encoder.", getattr(trainer, "text_encoder_lora", [])), ("unet.", getattr(trainer, "unet_lora", []))]:
            for m in mods:
                for pn, p in m.named_parameters():
                    out[prefix + m.name + "." + pn] = (p.grad if which == "grad" else p).detach().clone()
        return out

    group_kind = []                                                # param group -> lr slot
    for g in optimizer.param_groups:
        p0 = g["params"][0]
        group_kind.append(0 if p0 is trainer.text_encoder.get_input_embeddings().weight else
                          1 if any(p0 is q for q in trainer.text_encoder_lora.parameters()) else 2)

    dump, trace = {}, {}
    meta = {"generator": "tools/ref/gen_train_golden.py", "case": name, "config": opt_json,
            "concept_words": json.dumps(list(trainer.new_concept_cfg)),
            "new_concept_cfg": json.dumps(trainer.new_concept_cfg), "concept_token_ids": json.dumps(ids),
            "model": os.path.relpath(opt["models"]["pretrained_path"], ROOT), "steps": str(S),
            "batch": str(B), "image_size": str(H), "total_iter": repr(total_iter),
            "torch_seed": str(torch_seed), "data_seed": str(data_seed),
            "mixofshow": "51270fd (official code imported unchanged)", "diffusers": "0.19.3",
            "transformers": "4.31.0 behaviour via the checked shim in this script (see its header)",
            "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "loop": "train_edlora.py: 1 process, grad accumulation 1, float32 CPU (mixed_precision 'no')"}
    if init_log:
        dump["init.rand_feature_randn"] = init_log[0][1] if len(init_log) == 1 else torch.stack([x[1] for x in init_log])
    if replay is not None:      # --verify: parameters and draws from the dump only
        emb = trainer.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for n, v in params("value").items():
                src = torch.from_numpy(np.array(replay["step1.param_in." + n]))
                if n == "token_embedding.concept":
                    emb[ids] = src
                else:
                    dict((pre + m.name + "." + pn, p) for pre, mods in [("text_encoder.", trainer.text_encoder_lora),
                         ("unet.", trainer.unet_lora)] for m in mods for pn, p in m.named_parameters())[n].copy_(src)
        original_embedding = copy.deepcopy(trainer.text_encoder.get_input_embeddings().weight)
        rec.replay = []
        for k in range(1, S + 1):
            p = "step%d." % k
            rec.replay += [("vae_eps", replay[p + "vae_eps"]), ("randn_like", replay[p + "noise_randn"])]
            if p + "noise_offset_randn" in replay:
                rec.replay.append(("randn", replay[p + "noise_offset_randn"]))
            rec.replay.append(("randint", replay[p + "timesteps"]))
        rec.replay = [(kk, torch.from_numpy(np.array(v))) for kk, v in rec.replay]
    dump.update({"step1.param_in." + k: v for k, v in params("value").items()})

    captured = {}
    h1 = trainer.unet.register_forward_hook(lambda m, i, o: captured.__setitem__("model_pred", o.sample.detach().clone()))
    h2 = trainer.text_encoder.register_forward_pre_hook(lambda m, i: captured.__setitem__("input_ids", i[0].detach().clone()))
    real_reg = trainer.cal_attn_reg

    def reg(*a):
        r = real_reg(*a)
        captured["loss_attn"] = r.detach().clone()
        return r
    trainer.cal_attn_reg = reg
    norm_hist = []

    for k in range(1, S + 1):
        images, masks_t, img_masks, batch_prompts = synth_batch(rng, B, H, H, [prompts[(k * B + b) % len(prompts)] for b in range(B)], mask_plan(k))
        if replay is not None:
            p = "step%d." % k
            images, masks_t, img_masks = [torch.from_numpy(np.array(replay[p + x])) for x in ["images", "masks", "img_masks"]]
            batch_prompts = json.loads(replay["__metadata__"][p + "prompts"])
        batch = {"images": images, "masks": masks_t, "img_masks": img_masks, "prompts": batch_prompts}
        captured.clear()
        # --- train_edlora.py loop body ---
        trainer.unet.train()
        trainer.text_encoder.train()
        loss_dict = {}
        if "masks" in batch:
            masks = batch["masks"]
        else:
            masks = batch["img_masks"]
        loss = trainer(batch["images"], batch["prompts"], masks, batch["img_masks"])
        loss_dict["loss"] = loss
        index_no_updates = torch.arange(len(trainer.tokenizer)) != -1
        if not stop_emb_update:
            for token_id in trainer.get_all_concept_token_ids():
                index_no_updates[token_id] = False
        lrs = [0.0, 0.0, 0.0]
        for g, kind in zip(optimizer.param_groups, group_kind):
            lrs[kind] = g["lr"]
        loss.backward()
        if k == 1:
            trace.update({"step1.grad." + n: v for n, v in params("grad").items()})
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        token_embeds = trainer.text_encoder.get_input_embeddings().weight
        token_embeds.data[index_no_updates, :] = original_embedding.data[index_no_updates, :]
        token_embeds = trainer.text_encoder.get_input_embeddings().weight
        concept_token_ids = trainer.get_all_concept_token_ids()
        loss_dict["Norm_mean"] = token_embeds[concept_token_ids].norm(dim=-1).mean()
        if stop_emb_update is False and float(loss_dict["Norm_mean"]) >= train_opt.get("emb_norm_threshold", 5.5e-1):
            stop_emb_update = True
            original_embedding = copy.deepcopy(trainer.text_encoder.get_input_embeddings().weight)
        # --- end of the loop body ---
        log = rec.take()
        kinds = [x[0] for x in log]
        want = ["vae_eps", "randn_like"] + (["randn"] if opt["models"]["noise_offset"] is not None else []) + ["randint"]
        assert kinds == want, (kinds, want)
        draws = dict(zip(want, log))
        noise_final = draws["randn_like"][2]                     # target = noise after the in-place offset
        loss_mask = masks if opt["models"]["use_mask_loss"] else img_masks
        with torch.no_grad():
            mp = captured["model_pred"]
            l_mse = F.mse_loss(mp.float(), noise_final.float(), reduction="none")
            l_mse = ((l_mse * loss_mask).sum([1, 2, 3]) / loss_mask.sum([1, 2, 3])).mean()
        l_attn = captured.get("loss_attn")
        if l_attn is None:
            assert torch.equal(loss.detach(), l_mse)
        elif torch.isnan(l_attn):
            assert torch.equal(loss.detach(), l_mse)
        else:
            assert torch.equal(loss.detach(), l_mse + l_attn), (loss, l_mse, l_attn)
        p = "step%d." % k
        dump[p + "images"] = images
        dump[p + "masks"] = masks_t
        dump[p + "img_masks"] = img_masks
        dump[p + "input_ids"] = captured["input_ids"]
        dump[p + "vae_eps"] = draws["vae_eps"][1]
        dump[p + "noise_randn"] = draws["randn_like"][1]
        if "randn" in draws:
            dump[p + "noise_offset_randn"] = draws["randn"][1]
        dump[p + "timesteps"] = draws["randint"][1]
        meta[p + "prompts"] = json.dumps(batch_prompts)
        f64 = lambda x: torch.tensor([float("nan") if x is None else float(x)], dtype=torch.float64)
        trace[p + "loss"] = f64(loss)
        trace[p + "loss_mse"] = f64(l_mse)
        trace[p + "loss_attn"] = f64(l_attn)
        trace[p + "lr"] = torch.tensor(lrs, dtype=torch.float64)
        trace[p + "model_pred"] = captured["model_pred"]
        trace[p + "norm_mean"] = f64(loss_dict["Norm_mean"])
        trace[p + "stop_emb_update"] = torch.tensor([int(stop_emb_update)], dtype=torch.int64)
        norm_hist.append(float(loss_dict["Norm_mean"]))
        print("  %s step %d: loss %.9g mse %.9g attn %s lr %s t %s norm %.6g%s" % (
            name, k, float(loss), float(l_mse), "-" if l_attn is None else "%.6g" % float(l_attn), lrs,
            draws["randint"][1].tolist(), norm_hist[-1], " (emb frozen)" if stop_emb_update else ""))
    h1.remove(); h2.remove()
    trace.update({"final." + n: v for n, v in params("value").items()})
    moved = {n: float((trace["final." + n].double() - dump["step1.param_in." + n].double()).abs().max())
             for n in params("value")}
    tmeta = dict(meta, scalars="loss, loss_mse, loss_attn, norm_mean: F64 shape [1] (loss_attn NaN when absent or "
                 "NaN in the official code: the total then excludes it); lr: F64 [3] = embedding, text-encoder "
                 "LoRA, UNet LoRA lr used in the step (0 for a disabled group); stop_emb_update: I64 [1] after the step")
    for key in list(meta):
        if key.endswith(".prompts"):
            tmeta.pop(key)
    if replay is not None:
        rec.replay = None
        return dump, trace
    os.makedirs(out_dir, exist_ok=True)
    n1 = write_safetensors(os.path.join(out_dir, name + ".dump.safetensors"), dump, meta)
    n2 = write_safetensors(os.path.join(out_dir, name + ".trace.safetensors"), trace, tmeta)
    print("  %s: dump %d B (%d tensors), trace %d B (%d tensors); max |final - init|: emb %.3g, te %.3g, unet %.3g" % (
        name, n1, len(dump), n2, len(trace), moved.get("token_embedding.concept", 0),
        max([v for n, v in moved.items() if n.startswith("text_encoder.")] or [0]),
        max([v for n, v in moved.items() if n.startswith("unet.")] or [0])))
    return norm_hist


# ---------------------------------------------------------------------------------------------
# Model B: a UNet of other widths and head counts; the other parts are tiny-sd's (symlinks)
# ---------------------------------------------------------------------------------------------
MODEL_B_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[24, 48, 48, 48],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=[3, 2, 4, 3])   # (0.19.3: = heads)


def make_model_b(folder):
    un = sys.modules["diffusers.models.unet_2d_condition"]
    torch.manual_seed(4321)
    unet = un.UNet2DConditionModel(**MODEL_B_UNET)
    with torch.no_grad():                     # default init leaves tiny outputs; widen the spread a bit
        for n, p in unet.named_parameters():
            if n.endswith("weight") and p.dim() >= 2:
                p.mul_(1.5)
    os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
    unet.save_config(os.path.join(folder, "unet"))
    sd = {k: v.detach().float().contiguous() for k, v in unet.state_dict().items()}
    write_safetensors(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), sd,
                      {"format": "pt", "generator": "tools/ref/gen_train_golden.py (torch.manual_seed(4321), "
                       "diffusers default init, weights of dim >= 2 x 1.5)"})
    for part in ["vae", "text_encoder", "tokenizer", "scheduler"]:
        link = os.path.join(folder, part)
        target = os.path.relpath(os.path.join(TINY, part), folder)
        if not os.path.islink(link):
            os.symlink(target, link)
    mi = json.load(open(os.path.join(TINY, "model_index.json")))
    json.dump(mi, open(os.path.join(folder, "model_index.json"), "w"), indent=2)
    print("model_b: %d UNet parameters" % sum(v.numel() for v in sd.values()))


def verify(te, rec, name, out_dir):
    """Rerun the official trainer from the DUMP alone (its parameters, inputs and draws; a different
    torch seed so that anything not replayed would show) and require the same TRACE bit for bit."""
    dump, meta = read_safetensors(os.path.join(out_dir, name + ".dump.safetensors"))
    gold, _ = read_safetensors(os.path.join(out_dir, name + ".trace.safetensors"))
    dump = dict(dump, __metadata__=meta)
    opt = json.loads(meta["config"])
    B, H, S = int(meta["batch"]), int(meta["image_size"]), int(meta["steps"])
    _, trace = run_case(te, rec, name, opt, B, H, S, float(meta["total_iter"]), lambda k: ["ones"] * B, 0, 999, ["x"],
                        out_dir, replay=dump)
    assert sorted(trace) == sorted(gold), set(trace) ^ set(gold)
    bad = [k for k in trace if not np.array_equal(trace[k].numpy(), gold[k], equal_nan=True)]
    assert not bad, bad
    print("  %s: replay from the dump reproduces all %d trace tensors bit for bit" % (name, len(gold)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mos", default="/tmp/mos")
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--cases", default="a,b,c,d,e,f")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--verify", default="", help="cases to re-run from their dump only (e.g. b,c,e)")
    a = ap.parse_args()
    te, CLIPTextModel = install_shims(a.mos, a.diffusers)
    torch.set_num_threads(2)
    check_clip_shim(CLIPTextModel)
    rec = Recorder()
    rec.install()
    if a.verify:
        for name in a.verify.split(","):
            verify(te, rec, name, a.out)
        return
    cases = a.cases.split(",")
    T = 10.0          # total_iter = len(train_dataset) / batch (a float in train_edlora.py)
    if "a" in cases:  # ED-LoRA + masks + attention regulariser (512^2: the regulariser's resolutions)
        run_case(te, rec, "a", base_opt(), 2, 512, 3, T,
                 lambda k: [["blob", "blob"], ["ones", "ones"], ["blob", "ones"]][k - 1], 101, 1, ED_PROMPTS, a.out)
    if "b" in cases:  # no regulariser, img_masks as the loss mask, no noise offset
        run_case(te, rec, "b", base_opt(attn_reg_weight=None, use_mask_loss=False, noise_offset=None), 2, 128, 5, T,
                 lambda k: ["blob", "blob"] if k % 2 else ["blob", "ones"], 102, 2, ED_PROMPTS, a.out)
    if "c" in cases:  # plain LoRA: one new token per word, prompts name the tokens themselves
        run_case(te, rec, "c", base_opt(enable_edlora=False, attn_reg_weight=None), 2, 128, 5, T,
                 lambda k: ["blob", "ones"], 103, 3, LORA_PROMPTS, a.out)
    if "d" in cases:  # reg_full_identity, lr x 100 (threshold raised: at lr 0.1 the embedding norm passes
        opt = base_opt(reg_full_identity=True, finetune_cfg=finetune_cfg(100.0))   # 0.55 in step 1; e tests that)
        opt["train"]["emb_norm_threshold"] = 100.0
        run_case(te, rec, "d", opt, 1, 512, 3, T,
                 lambda k: [["blob"], ["ones"], ["blob"]][k - 1], 104, 4, ED_PROMPTS, a.out)
    if "e" in cases:  # emb_norm_threshold between Norm_mean after step 1 and after step 2
        opt = base_opt(attn_reg_weight=None, finetune_cfg=finetune_cfg(10.0))
        opt["train"]["emb_norm_threshold"] = 1e9
        hist = run_case(te, rec, "e", opt, 2, 128, 5, T, lambda k: ["blob", "ones"], 105, 5, ED_PROMPTS, "/tmp/reftrain_probe")
        assert hist[1] > hist[0], hist
        opt["train"]["emb_norm_threshold"] = (hist[0] + hist[1]) / 2
        print("  e: emb_norm_threshold %r (Norm_mean after steps 1, 2: %r, %r)" % (opt["train"]["emb_norm_threshold"], hist[0], hist[1]))
        run_case(te, rec, "e", opt, 2, 128, 5, T, lambda k: ["blob", "ones"], 105, 5, ED_PROMPTS, a.out)
    if "f" in cases:  # case a's settings on model_b
        mb = os.path.join(a.out, "model_b")
        make_model_b(mb)
        run_case(te, rec, "f", base_opt(pretrained_path=mb), 2, 512, 2, T,
                 lambda k: [["blob", "blob"], ["blob", "ones"]][k - 1], 106, 6, ED_PROMPTS, a.out)


if __name__ == "__main__":
    main()
