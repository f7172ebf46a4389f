#!/usr/bin/python3
"""Golden files for regionally controllable sampling (mixshow_regional.c, `mixshow sample
--prompt_rewrite ...`), read by tests/test_regional.c. Writes tests/data/regional/.

    /usr/bin/python3 tools/ref/gen_regional_golden.py [--mos /tmp/mos] [--diffusers /tmp/diffusers-0.19.3/src]
        [--sh /work/shared/mixofshow-data/regionally_sample.sh]

What runs is the OFFICIAL code of Mix-of-Show (commit 51270fd, unpacked at --mos):
regionally_controlable_sampling.py's prepare_text and sample_image, and
mixofshow/pipelines/pipeline_regionally_t2iadapter.py RegionallyT2IAdapterPipeline (its
__call__, _encode_region_prompt and RegionT2I_AttnProcessor), on the real diffusers 0.19.3
UNet2DConditionModel, AutoencoderKL, T2IAdapter and DPMSolverMultistepScheduler, in float32.
Shims only (nothing of the method is re-implemented here):
  - transformers: the checked CLIPTokenizer / CLIPTextModel stand-in of gen_train_golden.py
    (bit-exact against transformers 4.31); einops.rearrange for the four patterns used;
  - the pipeline's base class StableDiffusionAdapterPipeline: its methods check_inputs,
    prepare_latents, prepare_extra_step_kwargs, run_safety_checker, decode_latents and the
    module function _preprocess_adapter_image are taken from the diffusers 0.19.3 source file
    itself (ast, exec); DiffusionPipeline's numpy_to_pil / progress_bar are trivial stand-ins.
    __init__ (register_modules, the hub) is bypassed: the modules are set as attributes and
    revise_regionally_t2iadapter_attention_forward(unet) is called as __init__ does;
  - adapters are built in float32 from models/tiny-sd/t2iadapter_{openpose,sketch} instead of
    downloaded (the official build_model fetches TencentARC's in float16).
The official script cannot run without any condition image (width = height = 0 and
len(None)): the "none" case gives the keypose adapter weight 0.0, which adds exact zeros to the
UNet's residuals (x + 0 == x), i.e. the numbers of sampling without an adapter.

Fused tiny model (tests/data/regional/fused): models/tiny-sd's UNet, VAE and scheduler (links),
its tokenizer plus 64 added tokens <new0>..<new63> (tokenizer/added_tokens.json), the text
encoder in F16 with 64 new random embedding rows, new_concept_cfg.json for <cat1> <cat2>
<dog1> <dog2> (16 tokens each), as Mix-of-Show's fusion writes a combined model.

Outputs: fused/, keypose.png (RGB), sketch.png (L), <case>.trace.safetensors (latents_init,
step{i}.eps, step{i}.latents, u8 (H,W,3) the official PIL image's pixels; metadata: the
command-line arguments as JSON), parse.json (every `python regionally_controlable_sampling.py`
call of regionally_sample.sh, with both character blocks switched on: its arguments and what
prepare_text makes of --prompt_rewrite for an assumed 1024 x 2048 condition).
"""
import argparse, ast, importlib, inspect, json, os, subprocess, sys, types, warnings

os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import read_safetensors, versions, write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "models", "tiny-sd")
OUT = os.path.join(ROOT, "tests", "data", "regional")
WORDS = ["<cat1>", "<cat2>", "<dog1>", "<dog2>"]
W, H, STEPS, SEED = 128, 64, 8, 23

PROMPT = "a cat and a dog near a forest"
NEG = "lowres, bad anatomy"
REWRITE = ("[a <cat1> <cat2>, sitting near a forest]-*-[lowres, blurry]-*-[4, 2, 64, 56]|"
           "[a <dog1> <dog2>, standing]-*-[lowres]-*-[0, 40, 50, 100]|"
           "[a tree]-*-[]-*-[10, 88, 64, 128]")
CASES = [  # name, keypose weight, sketch (None: not used)
    ("kp", 1.0, None),
    ("kpsk", 0.8, 0.6),
    ("none", 0.0, None),
]


def rearrange(t, pattern, **ax):
    if pattern in ("(b n) m c -> b n m c", "(b l) n -> b l n"):
        b = ax["b"]
        return t.reshape((b, t.shape[0] // b) + tuple(t.shape[1:]))
    if pattern == "b (h w) c -> b h w c":
        return t.reshape(t.shape[0], ax["h"], ax["w"], t.shape[2])
    if pattern == "b h w c -> b (h w) c":
        return t.reshape(t.shape[0], t.shape[1] * t.shape[2], t.shape[3])
    raise NotImplementedError(pattern)


def make_fused(torch):
    """tests/data/regional/fused: a combined model as Mix-of-Show's fusion saves it."""
    d = os.path.join(OUT, "fused")
    for sub in ("tokenizer", "text_encoder"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    for sub in ("unet", "vae", "scheduler", "t2iadapter_openpose", "t2iadapter_sketch"):
        p = os.path.join(d, sub)
        if not os.path.islink(p):
            os.symlink(os.path.join("..", "..", "..", "..", "models", "tiny-sd", sub), p)
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(d, "tokenizer", f)
        if not os.path.islink(p):
            os.symlink(os.path.join("..", "..", "..", "..", "..", "models", "tiny-sd", "tokenizer", f), p)
    open(os.path.join(d, "model_index.json"), "w").write(open(os.path.join(TINY, "model_index.json")).read())
    V = 49408
    names = ["<new%d>" % i for i in range(16 * len(WORDS))]
    json.dump({n: V + i for i, n in enumerate(names)}, open(os.path.join(d, "tokenizer", "added_tokens.json"), "w"))
    cfg = {w: {"concept_token_ids": list(range(V + 16 * k, V + 16 * k + 16)),
               "concept_token_names": names[16 * k:16 * k + 16]} for k, w in enumerate(WORDS)}
    json.dump(cfg, open(os.path.join(d, "new_concept_cfg.json"), "w"), indent=2)
    tc = json.load(open(os.path.join(TINY, "text_encoder", "config.json")))
    tc["vocab_size"] = V + len(names)
    json.dump(tc, open(os.path.join(d, "text_encoder", "config.json"), "w"), indent=2)
    sd, _ = read_safetensors(os.path.join(TINY, "text_encoder", "model.safetensors"))
    g = torch.Generator().manual_seed(1212)
    key = "text_model.embeddings.token_embedding.weight"
    new = (torch.randn((len(names), sd[key].shape[1]), generator=g) * 0.5).numpy()
    sd[key] = np.concatenate([np.asarray(sd[key], np.float32), new])
    sd = {k: np.asarray(v, np.float32).astype(np.float16) for k, v in sd.items() if "position_ids" not in k}
    write_safetensors(os.path.join(d, "text_encoder", "model.safetensors"), sd, {"format": "pt"})
    return d


def make_conditions():
    from PIL import Image
    rng = np.random.RandomState(77)
    yy, xx = np.mgrid[0:H, 0:W]
    kp = np.zeros((H, W, 3), np.uint8)
    for k in range(6):                                   # a few coloured blobs and lines ("keypoints")
        cy, cx = rng.randint(0, H), rng.randint(0, W)
        kp[(yy - cy) ** 2 + (xx - cx) ** 2 < 30] = rng.randint(60, 256, size=3)
        kp[np.abs((yy - cy) * 3 - (xx - cx)) < 2] = rng.randint(60, 256, size=3)
    sk = ((np.sin(xx / 5.0) + np.cos(yy / 7.0) > 0.6) * 255).astype(np.uint8)
    Image.fromarray(kp, "RGB").save(os.path.join(OUT, "keypose.png"))
    Image.fromarray(sk, "L").save(os.path.join(OUT, "sketch.png"))


def base_class(dsrc, torch):
    """StableDiffusionAdapterPipeline with its own methods from the diffusers 0.19.3 source."""
    import PIL
    path = os.path.join(dsrc, "diffusers", "pipelines", "t2i_adapter", "pipeline_stable_diffusion_adapter.py")
    tree = ast.parse(open(path).read())
    du = importlib.import_module("diffusers.utils")
    tu = importlib.import_module("diffusers.utils.torch_utils")
    ns = dict(torch=torch, np=np, PIL=PIL, inspect=inspect, warnings=warnings, PIL_INTERPOLATION=du.PIL_INTERPOLATION,
              randn_tensor=tu.randn_tensor, List=list, Optional=object, Union=object, Callable=object, Dict=dict,
              Any=object, logger=None)
    keep = {"check_inputs", "prepare_latents", "prepare_extra_step_kwargs", "run_safety_checker", "decode_latents"}
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "_preprocess_adapter_image":
            body.append(node)
        if isinstance(node, ast.ClassDef) and node.name == "StableDiffusionAdapterPipeline":
            cls = ast.ClassDef(name="StableDiffusionAdapterPipeline", bases=[], keywords=[], decorator_list=[],
                               body=[n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in keep])
            body.append(cls)
    mod = ast.Module(body=body, type_ignores=[])
    ast.fix_missing_locations(mod)
    exec(compile(mod, path, "exec"), ns)
    Base = ns["StableDiffusionAdapterPipeline"]

    class Bar:
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def update(self, *a): pass
    Base.progress_bar = lambda self, iterable=None, total=None: Bar()
    Base.numpy_to_pil = staticmethod(lambda images: [PIL.Image.fromarray(i) for i in (images * 255).round().astype("uint8")])
    Base._execution_device = property(lambda self: torch.device("cpu"))
    Base.device = property(lambda self: torch.device("cpu"))

    class Output:
        def __init__(self, images, nsfw_content_detected): self.images = images
    return Base, Output, ns["_preprocess_adapter_image"]


def install(mos, dsrc):
    import gen_train_golden as gt
    te_mod, CLIPTextModel = gt.install_shims(mos, dsrc)
    import torch
    sys.modules["einops"].rearrange = rearrange
    Base, Output, prep = base_class(dsrc, torch)

    def mod(name, **attrs):
        m = types.ModuleType(name); m.__dict__.update(attrs); m.__path__ = []; sys.modules[name] = m
        return m
    mod("diffusers.pipelines.stable_diffusion.safety_checker", StableDiffusionSafetyChecker=object)
    mod("diffusers.pipelines.t2i_adapter")
    mod("diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter", StableDiffusionAdapterPipeline=Base,
        StableDiffusionAdapterPipelineOutput=Output, _preprocess_adapter_image=prep)
    sys.modules["transformers"].CLIPFeatureExtractor = object
    rp = importlib.import_module("mixofshow.pipelines.pipeline_regionally_t2iadapter")
    # regionally_controlable_sampling.py: its functions, without running its main
    src = open(os.path.join(mos, "regionally_controlable_sampling.py")).read()
    tree = ast.parse(src)
    fns = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("sample_image", "prepare_text")],
                     type_ignores=[])
    ns = {}
    exec(compile(fns, "regionally_controlable_sampling.py", "exec"), ns)
    return torch, gt, rp, ns["sample_image"], ns["prepare_text"]


def build_pipe(torch, gt, rp, dsrc, fused):
    un = importlib.import_module("diffusers.models.unet_2d_condition")
    ak = importlib.import_module("diffusers.models.autoencoder_kl")
    ad = importlib.import_module("diffusers.models.adapter")
    dpm = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_multistep").DPMSolverMultistepScheduler

    def build(cls, folder):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        m = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        sd, _ = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        m.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}, strict=True)
        return m.eval()
    P = rp.RegionallyT2IAdapterPipeline
    pipe = P.__new__(P)
    pipe.unet = build(un.UNet2DConditionModel, os.path.join(fused, "unet"))
    pipe.vae = build(ak.AutoencoderKL, os.path.join(fused, "vae"))
    tok = gt.CLIPTokenizer.from_pretrained(fused, subfolder="tokenizer")
    added = json.load(open(os.path.join(fused, "tokenizer", "added_tokens.json")))
    for t, i in sorted(added.items(), key=lambda kv: kv[1]):   # from_pretrained reads added_tokens.json
        tok.add_tokens([t]); assert tok.convert_tokens_to_ids(t) == i
    pipe.tokenizer = tok
    te = sys.modules["transformers"].CLIPTextModel.from_pretrained(fused, subfolder="text_encoder")
    te_fwd = te.forward

    def te_forward(input_ids, attention_mask=None):   # transformers' signature (the pipeline passes None)
        assert attention_mask is None
        return te_fwd(input_ids)
    te.forward = te_forward
    te.dtype = torch.float32                          # PreTrainedModel.dtype
    pipe.text_encoder = te
    pipe.safety_checker, pipe.feature_extractor = None, None
    pipe.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    pipe.new_concept_cfg = None
    rp.revise_regionally_t2iadapter_attention_forward(pipe.unet)      # what __init__ does
    pipe.set_new_concept_cfg(json.load(open(os.path.join(fused, "new_concept_cfg.json"))))
    pipe.scheduler = dpm.from_config(json.load(open(os.path.join(fused, "scheduler", "scheduler_config.json"))))
    pipe.keypose_adapter = build(ad.T2IAdapter, os.path.join(fused, "t2iadapter_openpose"))
    pipe.sketch_adapter = build(ad.T2IAdapter, os.path.join(fused, "t2iadapter_sketch"))
    return pipe


def parse_sh(sh, prepare_text):
    text = open(sh).read().replace("anime_character=0", "anime_character=1")
    calls = []
    script = "python() { printf '%s\\0' \"$@\"; printf '\\1'; }\n" + text
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout.decode()
    for call in out.split("\1"):
        args = [a for a in call.split("\0") if a != ""]
        if not args:
            continue
        assert args[0] == "regionally_controlable_sampling.py", args[0]
        opts = dict(a[2:].split("=", 1) for a in args[1:])
        Hh, Ww = 1024, 2048
        prompt, regions = prepare_text(opts["prompt"], opts["prompt_rewrite"], Hh, Ww)
        calls.append(dict(argv=args, height=Hh, width=Ww, prompt=prompt,
                          regions=[dict(prompt=p, negative=n, box=list(map(float, b))) for p, n, b in regions]))
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mos", default="/tmp/mos")
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--sh", default="/work/shared/mixofshow-data/regionally_sample.sh")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch, gt, rp, sample_image, prepare_text = install(a.mos, a.diffusers)
    torch.set_num_threads(1)
    from PIL import Image
    fused = make_fused(torch)
    make_conditions()
    json.dump(dict(calls=parse_sh(a.sh, prepare_text), source="regionally_sample.sh via the official prepare_text"),
              open(os.path.join(OUT, "parse.json"), "w"), indent=1)
    pipe = build_pipe(torch, gt, rp, a.diffusers, fused)
    kp_img = Image.open(os.path.join(OUT, "keypose.png")).convert("RGB")
    sk_img = Image.open(os.path.join(OUT, "sketch.png")).convert("L")
    for name, kw, sw in CASES:
        T = {}

        def cb(i, t, latents):
            T["step%d.latents" % i] = latents.clone().numpy()
        orig_unet = pipe.unet.forward

        def unet_fwd(*args, **kwargs):               # records eps (uncond, cond) of each call
            out = orig_unet(*args, **kwargs)
            T["step%d.eps" % len([k for k in T if k.endswith(".eps")])] = out.sample.clone().numpy()
            return out
        pipe.unet.forward = unet_fwd
        orig_prep = pipe.prepare_latents

        def prep(*args, **kwargs):
            lat = orig_prep(*args, **kwargs)
            T["latents_init"] = lat.clone().numpy()
            return lat
        pipe.prepare_latents = prep
        with torch.no_grad():
            input_prompt = [prepare_text(PROMPT, REWRITE, H, W)]
            img = sample_image(pipe, input_prompt=input_prompt, input_neg_prompt=[NEG] * len(input_prompt),
                               generator=torch.Generator("cpu").manual_seed(SEED),
                               sketch_adaptor_weight=sw if sw is not None else 1.0, region_sketch_adaptor_weight="",
                               keypose_adaptor_weight=kw, region_keypose_adaptor_weight="",
                               keypose_condition=kp_img, sketch_condition=sk_img if sw is not None else None,
                               height=H, width=W, num_inference_steps=STEPS, callback=cb)
        del pipe.unet.forward, pipe.prepare_latents
        T["u8"] = np.array(img[0])
        argv = ["--pretrained_model=" + "tests/data/regional/fused", "--prompt=" + PROMPT, "--negative_prompt=" + NEG,
                "--prompt_rewrite=" + REWRITE, "--keypose_condition=tests/data/regional/keypose.png",
                "--keypose_adaptor_weight=%r" % kw, "--seed=%d" % SEED, "--steps=%d" % STEPS]
        if sw is not None:
            argv += ["--sketch_condition=tests/data/regional/sketch.png", "--sketch_adaptor_weight=%r" % sw]
        assert len([k for k in T if k.endswith(".eps")]) == STEPS
        meta = dict(versions(), argv=json.dumps(argv), case=name, steps=str(STEPS),
                    note="official RegionallyT2IAdapterPipeline (Mix-of-Show 51270fd) on diffusers 0.19.3, float32")
        n = write_safetensors(os.path.join(OUT, name + ".trace.safetensors"), T, meta)
        print(name, n, "bytes")


if __name__ == "__main__":
    main()
