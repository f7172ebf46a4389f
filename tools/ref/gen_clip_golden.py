#!/usr/bin/python3
"""Golden files for models/clip.c (read by tests/test_clip.c), from HF transformers 4.31:

  tests/data/clip_tokenizer_golden.json   CLIPTokenizer input ids of ~700 prompts under three
                                          added-token sets
  tests/data/clip_golden.safetensors      CLIPTextModel last_hidden_state and gradients (new
                                          embedding rows, LoRA) on the tiny model and on a
                                          2-layer SD-1.5-width stack with generated weights

    /usr/bin/python3 tools/ref/gen_clip_golden.py --transformers /tmp/transformers-4.31/src

transformers is not packaged for Debian and its repository is too large to fetch whole here: the
sources used are main at the v4.31.0 branch point, commit 49eb357564c74ca3e1813dc2a8bf036ca81ec535
(2023-07-17; the next commit on main bumps to 4.32.0.dev0), e.g.
    git -C <a transformers clone> archive 49eb3575 src/transformers | tar -x -C /tmp/transformers-4.31
The real modules are imported (not copied): tokenization_clip, tokenization_utils(_base),
modeling_clip, configuration_clip. Packages they need but never use here (huggingface_hub,
requests, tqdm, filelock, yaml, safetensors, packaging) are stubbed, and `tokenizers` is stubbed
by a minimal AddedToken (str() = content, equality by content), as a standard install has the
real one (transformers' own fallback dataclass lacks __str__ and breaks the slow tokenizer).
ftfy is NOT installed, so CLIPTokenizer takes its BasicTokenizer path: that is what we match.
Needs python3-regex (CLIP's pattern uses \\p{L}, \\p{N}).
"""
import argparse, glob, importlib, importlib.machinery, json, os, random, re, sys, types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "/work/shared/models/tiny-sd"
DATA = "/work/shared/mixofshow-data"


def import_transformers(src):
    class Anything(types.ModuleType):
        def __getattr__(self, a):
            if a.startswith("__"):
                raise AttributeError(a)
            return type(a, (Exception,), {"__init__": lambda s, *x, **k: None, "__call__": lambda s, *x, **k: None})

    def stub(name):
        m = Anything(name); m.__path__ = []; m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = m
        return m
    for name in ["huggingface_hub", "huggingface_hub.utils", "huggingface_hub.file_download",
                 "huggingface_hub.constants", "requests", "requests.exceptions", "tqdm", "tqdm.auto",
                 "filelock", "yaml", "safetensors", "safetensors.torch"]:
        stub(name)

    class V:
        def __init__(self, s): self.t = tuple(int(x) for x in re.findall(r"\d+", str(s))[:3])
        def __lt__(a, b): return a.t < b.t
        def __le__(a, b): return a.t <= b.t
        def __gt__(a, b): return a.t > b.t
        def __ge__(a, b): return a.t >= b.t
        def __eq__(a, b): return a.t == b.t
        def __hash__(self): return hash(self.t)
        base_version = property(lambda self: ".".join(map(str, self.t)))
        major = property(lambda self: self.t[0])
        minor = property(lambda self: self.t[1] if len(self.t) > 1 else 0)
    pk = stub("packaging"); pv = stub("packaging.version"); pv.parse = V; pv.Version = V; pk.version = pv

    class AddedToken:
        """tokenizers.AddedToken as the slow tokenizer uses it."""
        def __init__(self, content="", single_word=False, lstrip=False, rstrip=False, normalized=True):
            self.content, self.single_word, self.lstrip, self.rstrip, self.normalized = \
                content, single_word, lstrip, rstrip, normalized
        def __str__(self): return self.content
        def __repr__(self): return "AddedToken(%r)" % self.content
        def __getstate__(self): return dict(self.__dict__)
        def __eq__(self, o): return isinstance(o, AddedToken) and o.content == self.content
        def __hash__(self): return hash(self.content)
    tk = stub("tokenizers"); tk.AddedToken = AddedToken; tk.Encoding = type("Encoding", (), {})
    m = types.ModuleType("transformers"); m.__path__ = [os.path.join(src, "transformers")]; m.__version__ = "4.31.0"
    sys.modules["transformers"] = m
    for pkg in ["transformers.models", "transformers.models.clip"]:
        p = types.ModuleType(pkg); p.__path__ = [os.path.join(src, *pkg.split("."))]; sys.modules[pkg] = p
    dvc = types.ModuleType("transformers.dependency_versions_check"); dvc.dep_version_check = lambda *a, **k: None
    sys.modules["transformers.dependency_versions_check"] = dvc
    iu = importlib.import_module("transformers.utils.import_utils")
    iu._tokenizers_available = True
    tc = importlib.import_module("transformers.models.clip.tokenization_clip")
    mc = importlib.import_module("transformers.models.clip.modeling_clip")
    cc = importlib.import_module("transformers.models.clip.configuration_clip")
    return tc, mc, cc


# ---------------------------------------------------------------------------------------------
# Tokenizer goldens
# ---------------------------------------------------------------------------------------------
ADDED_SETS = [
    [],
    ["<new%d>" % i for i in range(32)] + ["<potter1>", "<potter2>"],
    # adversarial for Trie.split: overlapping / nested tokens, a vocab word, the unk token,
    # case variants, non-ASCII
    ["ab", "abc", "bcd", "b", "cd", "aa", "aaa", "<a", "<ab>", "a>", "cat", "<|endoftext|>",
     "Xy", "XY", "ünï", "猫猫", "😀x", "<new1>", "<new10>", "s'", "'s", "ab"],
]


def crafted():
    long_words = " ".join("word%d" % i for i in range(120))
    p = [
        "a photo of a cat", "A PHOTO OF A CAT", "", " ", "   \t\n  ", "a", "A", "cat", "cats!", "cat's",
        "don't stop, I'M here; we'LL see 'Re 've 'd 'm 's 't", "it'ſ ſtop", "'''s", "x's's", "!'s",
        "(((masterpiece))), best quality, [cat:dog:0.5], {blue eyes}", "a...b", "!!!???...",
        "1234567890", "3.14159 -2e10 1/2 100%", "½ Ⅻ ² ³ ① ⑴ ٣ ۴ ७ 一二三", "mixed123abc456", "x86_64 C++ C#",
        "word-word word_word word/word word\\word", "https://example.com/a?b=c&d=e#f", "user@mail.org",
        "Café café cafe\u0301 CAFE\u0301 naïve naı̈ve Ångström \u212bngstr\u00f6m \u2126 ohm",
        "e\u0301\u0323 e\u0323\u0301 a\u0308\u0304 \u1e0b\u0323 q\u0307\u0323", "ﬁsh ﬂower ﬀ ß STRASSE İstanbul ISTANBUL ıi",
        "ΟΔΥΣΣΕΥΣ Σ ΣΑΣ. ΑΣ' ΑΣ\u0301 Α\u0301Σ σς Σa aΣb", "Kelvin \u212a K k", "ＡＢＣ１２３ fullwidth ！？",
        "一只猫在桌子上 猫 狗", "日本語のテキスト カタカナ ひらがな", "한국어 텍스트 \u1100\u1161\u11a8 \u1100\u1161 \uac00\u11a8",
        "\uf900\uf901 compat ideographs \U0002f800", "\U00020000\U0002a700 ext ideographs",
        "emoji 😀😃🎉 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇺🇸 ❤️ ☕", "عربي نص العربية", "עברית טקסט", "हिन्दी पाठ क्षत्रिय",
        "ไทย ภาษา", "русский ТЕКСТ Ёлка", "Ελληνικά", "ᏣᎳᎩ", "ⓐⓑⓒ ⒶⒷⒸ", "\u0345 \u0399\u0345",
        "tab\tnew\nline\rcr\x0bvt\x0cff", "nbsp\u00a0ideo\u3000em\u2003thin\u2009", "ls\u2028ps\u2029nel\x85",
        "zw\u200bsp zwj\u200d bom\ufeff rlm\u200f", "bell\x07 esc\x1b del\x7f c1\x9b", "nul\x00char",
        "repl\ufffdchar", "pua\ue000\U000f0000", "unassigned\U000e0080\u0378\U0001fffe", "nonchar\ufdd0\uffff",
        "<|startoftext|>a cat<|endoftext|>", "<|STARTOFTEXT|> <|EndOfText|>", "<|endoftext|", "<|startoftext|>x",
        "a<|endoftext|>b<|endoftext|><|endoftext|>c", "!<|endoftext|>", "<|ſtartoftext|>",
        "</w> <w> < > << >>", "\"quoted\" 'single' `back`", "$100 €20 £5 ¥9", "a  b   c    d",
        "  leading and trailing  ", "UPPER lower MiXeD", "x" * 300, "ab" * 150, "a " * 80, "cat, " * 40,
        long_words, " ".join(["photo"] * 75), " ".join(["photo"] * 76), " ".join(["photo"] * 74),
        "supercalifragilisticexpialidocious antidisestablishmentarianism", "gpt-4 t5-xxl sd-1.5 sdxl",
        "<TOK> <new0> <NEW0> <new0><new1> <new1><new10> x<new0>y <new0>abc abc<new0> <new32> <new-1> <new",
        "<potter1> <potter2> <potter1><potter2> <potter12>", "abcd abcde xabcdx aaaa aaaaa <ab> <a <abc> a> cat catab",
        "Xy XY xy xY ünï Ünï 猫猫猫 😀x😀 s's 's' 'ss", "bcd cd b c d", "ab abc bcd b cd aa aaa <a <ab> a>",
    ]
    return p


def random_prompts(rng, n):
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        " \t\n.,;:!?'\"()[]{}<>|/\\-_+=*&^%$#@~`",
        "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿĀāĂăĄąĆćĈĉŒœŠšŸŽžſƒ",
        "\u0300\u0301\u0302\u0303\u0308\u0323\u0327\u0345\u05b0\u0653\u093c\u0e31",
        "ΑΒΓΔΣσςπωЖжЯяЁё一二三人猫狗日本語カタカナひらがな한국어가각",
        "😀🎉👍🏽👨‍👩🇯🇵❤️☕\u200d\ufe0f",
        "\u00a0\u2003\u3000\u2028\u200b\ufeff\x00\x07\x85\ufffd\ue000",
    ]
    out = []
    for _ in range(n):
        L = rng.randint(0, 60)
        s = []
        for _ in range(L):
            r = rng.random()
            if r < 0.85:
                pool = pools[rng.randrange(len(pools))]
                s.append(pool[rng.randrange(len(pool))])
            else:
                while True:   # any code point of any plane except surrogates
                    cp = rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x3000)
                    if not 0xD800 <= cp <= 0xDFFF:
                        break
                s.append(chr(cp))
        out.append("".join(s))
    return out


def random_trie_prompts(rng, n):
    alpha = "abcd<> XyY'sü猫😀"
    return ["".join(alpha[rng.randrange(len(alpha))] for _ in range(rng.randint(1, 30))) for _ in range(n)]


def tokenizer_golden(tc, out_path):
    lines = []
    for f in sorted(glob.glob(os.path.join(DATA, "**", "*.txt"), recursive=True)):
        if "LICENSE" in os.path.basename(f):
            continue
        with open(f, encoding="utf-8") as fh:
            lines += fh.read().split("\n")
    seen = set(); prompts = []
    for ln in lines:
        if ln not in seen:
            seen.add(ln); prompts.append(ln)
    rng = random.Random(1234)
    cases = []   # (set, prompt)
    for p in prompts:                       # every prompt of the data set, plain
        cases.append((0, p))
    for i, p in enumerate(prompts):         # concept words as ED-LoRA tokens (layer i % 16)
        if "<TOK>" in p:
            k = i % 16
            cases.append((1, p.replace("<TOK>", "<new%d> <new%d>" % (k, 16 + k))))
            cases.append((1, p.replace("<TOK>", "<potter1> <potter2>")))
    for p in crafted():
        cases += [(0, p), (1, p), (2, p)]
    for p in random_prompts(rng, 150):
        cases.append((rng.randrange(3), p))
    for p in random_trie_prompts(rng, 120):
        cases.append((2, p))
    toks = []
    for s in ADDED_SETS:
        t = tc.CLIPTokenizer.from_pretrained(os.path.join(TINY, "tokenizer"))
        assert t.fix_text is None, "ftfy must not be installed: we match the BasicTokenizer path"
        t.add_tokens(list(s))
        toks.append(t)
    out = {"__metadata__": {"generator": "tools/ref/gen_clip_golden.py", "transformers": "4.31.0 (49eb3575)",
                            "python": sys.version.split()[0], "regex": importlib.import_module("regex").__version__,
                            "unicodedata": importlib.import_module("unicodedata").unidata_version,
                            "tokenizer": "tiny-sd/tokenizer (openai/clip-vit-large-patch14 vocab)",
                            "seed": 1234, "ftfy": "absent"},
           "added_sets": ADDED_SETS,
           "added_ids": [[t.convert_tokens_to_ids(x) for x in s] for t, s in zip(toks, ADDED_SETS)],
           "cases": []}
    for si, p in cases:
        ids = toks[si](p, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
        out["cases"].append({"set": si, "prompt": p, "ids": " ".join(map(str, ids))})
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, ensure_ascii=True, indent=0)
    print("%s: %d cases" % (out_path, len(out["cases"])))
    return toks


# ---------------------------------------------------------------------------------------------
# Text encoder goldens
# ---------------------------------------------------------------------------------------------
def splitmix_uniform(name, n):
    """Exact float32 values in [-1, 1): u = (splitmix64(seed + (i+1)*golden) >> 40) - 2^23, / 2^23;
    seed = FNV-1a 64 of the name. tests/test_clip.c computes the same numbers."""
    h = 0xcbf29ce484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    with np.errstate(over="ignore"):
        z = np.uint64(h) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.int64) - (1 << 23)
    return (u.astype(np.float64) / (1 << 23)).astype(np.float32)


def gen_value(name, shape):
    """The generated value of parameter `name` (scales are powers of two: exact in float32)."""
    n = int(np.prod(shape))
    u = splitmix_uniform(name, n).reshape(shape)
    if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or name.endswith("final_layer_norm.weight"):
        return (1.0 + u * np.float32(0.125)).astype(np.float32)
    if name.endswith(".bias"):
        return u * np.float32(1 / 64)
    if "embedding" in name:
        return u * np.float32(1 / 16)
    return u * np.float32(1 / 32)


def add_lora(torch, model, L, rank, alpha, gen):
    """Mix-of-Show LoRA on q/k/v/out_proj: y = W x + b + alpha * up(down(x)). gen(name, shape)."""
    params = {}
    for l in range(L):
        attn = model.text_model.encoder.layers[l].self_attn
        for pn in ["q_proj", "k_proj", "v_proj", "out_proj"]:
            lin = getattr(attn, pn)
            key = "text_model.encoder.layers.%d.self_attn.%s" % (l, pn)
            D_out, D_in = lin.weight.shape
            down = torch.nn.Parameter(torch.from_numpy(gen(key + ".lora_down.weight", (rank, D_in))))
            up = torch.nn.Parameter(torch.from_numpy(gen(key + ".lora_up.weight", (D_out, rank))))
            params[key + ".lora_down.weight"] = down
            params[key + ".lora_up.weight"] = up
            orig = lin.forward
            lin.forward = (lambda orig, down, up: lambda x: orig(x) + alpha * torch.nn.functional.linear(
                torch.nn.functional.linear(x, down), up))(orig, down, up)
    return params


def encoder_case(torch, mc, cc, prefix, cfg_dict, state, ids, n_new, rank, alpha, gen, out):
    cfg = cc.CLIPTextConfig(**cfg_dict)
    model = mc.CLIPTextModel(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    V, D = cfg.vocab_size, cfg.hidden_size
    model.resize_token_embeddings(V + n_new)                         # what Mix-of-Show does
    new_emb = gen(prefix + "new_emb", (n_new, D))
    emb = model.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        emb[V:] = torch.from_numpy(new_emb)
    for p in model.parameters():
        p.requires_grad_(False)
    emb.requires_grad_(True)
    lora = add_lora(torch, model, cfg.num_hidden_layers, rank, alpha, gen)
    ids_t = torch.tensor(ids, dtype=torch.int64)
    hs = model(input_ids=ids_t).last_hidden_state                     # SD: no attention_mask
    R = torch.from_numpy(gen(prefix + "R", tuple(hs.shape)))
    loss = (R.double() * hs.double()).sum()
    loss.backward()
    out[prefix + "ids"] = ids_t.to(torch.int32)
    out[prefix + "new_emb"] = torch.from_numpy(new_emb)
    out[prefix + "out"] = hs.detach()
    out[prefix + "d_new_emb"] = emb.grad[V:].clone()
    assert float(emb.grad[:V].abs().sum()) > 0   # (the frozen rows get gradients in torch; we skip them)
    for k, p in lora.items():
        out[prefix + "lora." + k] = p.detach()
        out[prefix + "d_lora." + k] = p.grad.clone()
    # plain model (no LoRA) forward, for the inference path
    return hs


def encoder_golden(torch, mc, cc, toks, out_path):
    from common import read_safetensors
    torch.manual_seed(0)
    out = {}
    # 1) tiny-sd text encoder, prompts with ED-LoRA tokens (set 1: 34 added tokens)
    cfg_tiny = json.load(open(os.path.join(TINY, "text_encoder", "config.json")))
    st = {k: np.array(v, dtype=np.float32) for k, v in read_safetensors(os.path.join(TINY, "text_encoder", "model.safetensors"))[0].items()
          if "position_ids" not in k}
    prompts = ["a photo of a <new0> <new16>", "<new5> <new21> walking on the street, 4k",
               "a cat", "<potter1> <potter2> and <new31> in the forest, detailed, masterpiece"]
    tk = toks[1]
    ids = [tk(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]
    n_new = len(tk) - tk.vocab_size
    g = lambda name, shape: gen_value("tiny." + name, shape)
    encoder_case(torch, mc, cc, "tiny.", cfg_tiny, st, ids, n_new, 4, 0.75, g, out)
    # plain forward (no LoRA, no new tokens) of the same model: inference-mode check
    model = mc.CLIPTextModel(cc.CLIPTextConfig(**cfg_tiny)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in st.items()}, strict=False)
    ids0 = [toks[0](p, padding="max_length", max_length=77, truncation=True).input_ids
            for p in ["a photo of a cat", "A watercolor painting of a dog, 4K"]]
    with torch.no_grad():
        out["tiny_plain.ids"] = torch.tensor(ids0, dtype=torch.int32)
        out["tiny_plain.out"] = model(input_ids=torch.tensor(ids0)).last_hidden_state
    # 2) SD-1.5 widths (768, 12 heads, 3072), 2 layers, vocab 1000, generated weights
    cfg_big = dict(vocab_size=1000, hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=77,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5)
    model = mc.CLIPTextModel(cc.CLIPTextConfig(**cfg_big))
    st = {k: gen_value("big." + k, tuple(v.shape)) for k, v in model.state_dict().items() if "position_ids" not in k}
    rng = np.random.RandomState(7)
    ids = rng.randint(0, 1003, size=(2, 77)).astype(np.int64)
    ids[:, 0] = 998; ids[0, 40:] = 999
    ids[0, 5] = 1000; ids[0, 17] = 1002; ids[1, 3] = 1001; ids[1, 60] = 1000; ids[1, 76] = 1002   # new rows
    g = lambda name, shape: gen_value("big." + name, shape)
    encoder_case(torch, mc, cc, "big.", cfg_big, st, ids.tolist(), 3, 4, 1.0, g, out)
    meta = {"generator": "tools/ref/gen_clip_golden.py", "transformers": "4.31.0 (49eb3575)",
            "torch": torch.__version__, "loss": "sum(R * last_hidden_state) in float64",
            "weights": "tiny: tiny-sd text_encoder; big: gen_value() (splitmix64 of FNV-1a(name))",
            "lora": "tiny rank 4 alpha 0.75; big rank 4 alpha 1.0; up != 0"}
    write_safetensors(out_path, out, meta)
    print("%s: %d tensors, %d bytes" % (out_path, len(out), os.path.getsize(out_path)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transformers", default="/tmp/transformers-4.31/src")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    tc, mc, cc = import_transformers(a.transformers)
    toks = tokenizer_golden(tc, os.path.join(ROOT, "tests", "data", "clip_tokenizer_golden.json"))
    encoder_golden(torch, mc, cc, toks, os.path.join(ROOT, "tests", "data", "clip_golden.safetensors"))


if __name__ == "__main__":
    main()
