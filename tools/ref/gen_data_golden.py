#!/usr/bin/python3
"""Golden data for tests/test_data.c: Python's random, torch's draws, the official Mix-of-Show
instance transforms (mixofshow/data/pil_transform.py from /tmp/mos, commit 51270fd, imported as
is, with the real Pillow / torchvision / OpenCV) and LoraDataset + torch DataLoader.

Run from the repository root:  /usr/bin/python3 tools/ref/gen_data_golden.py [/tmp/mos]
Needs: apt-get install -y python3-pil python3-opencv python3-torchvision (Debian 12: Pillow 9.4,
torch 1.13, torchvision 0.14, OpenCV 4.6).

Writes tests/data/train_data/:
  random_golden.safetensors      random.* and torch draws for several seeds
  transform_golden.safetensors   inputs, resize checks, per-case masks and image checksums
  transform_golden.json          per case: pipeline, seed, final prompt, error (if official raised)
  concept/{image,caption,mask}/  a small synthetic concept, concept_list.json
  loader_golden.json             the dataset list after random.shuffle and 3 epochs of batches
Float images are 3x512x512: they are checked by CRC-32 of their float32 bytes plus every 1009th
value (to print on failure), masks (64x64 float64) are stored whole (img_mask as float32: its values k/4 are exact there).
"""
import json
import os
import random
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_safetensors  # noqa: E402

MOS = sys.argv[1] if len(sys.argv) > 1 else "/tmp/mos"
sys.path.insert(0, MOS)
warnings.filterwarnings("ignore")

import cv2  # noqa: E402
import PIL  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

from mixofshow.data import pil_transform  # noqa: E402
from mixofshow.data.lora_dataset import LoraDataset  # noqa: E402
from mixofshow.data.pil_transform import PairCompose, build_transform  # noqa: E402

OUT = "tests/data/train_data"
STRIDE = 1009
LOADER_STRIDE = 10007
META = {"generator": "tools/ref/gen_data_golden.py", "python": sys.version.split()[0],
        "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
        "opencv": cv2.__version__, "numpy": np.__version__, "mixofshow": "51270fd"}


def crc(a):
    return zlib.crc32(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())


# ---------------------------------------------------------------------------------------------
# 1. random and torch draws
def gen_random():
    t = {}
    for seed in [0, 1, 42, 2**32 + 5, 123456789012345, 2**64 - 1]:
        r = random.Random(seed)
        k = f"s{seed}"
        t[k + ".random"] = np.array([r.random() for _ in range(500)])
        rngs = [0, 1, 2, 3, 7, 100, 511, 1000, 2**31, 2**40]
        t[k + ".randint"] = np.array([r.randint(0, rngs[i % len(rngs)]) for i in range(300)], dtype=np.int64)
        t[k + ".randint_neg"] = np.array([r.randint(-5, 17) for i in range(50)], dtype=np.int64)
        t[k + ".getrandbits"] = np.array([r.getrandbits(1 + i % 64) for i in range(200)], dtype=np.uint64)
        t[k + ".uniform"] = np.array([r.uniform(0.5, 1.0) for _ in range(50)])
        lst = list(range(37))
        r.shuffle(lst)
        t[k + ".shuffle"] = np.array(lst, dtype=np.int64)
        t[k + ".choice"] = np.array([r.choice(range(27)) for _ in range(50)], dtype=np.int64)
        t[k + ".after"] = np.array([r.random()])
    for seed in [0, 1, 1234]:
        k = f"t{seed}"
        torch.manual_seed(seed)
        t[k + ".rand"] = torch.cat([torch.rand(1) for _ in range(20)])
        rngs = [1, 2, 3, 100, 513, 2**31, 2**32, 2**32 + 7, 2**40]
        t[k + ".randint"] = torch.cat([torch.randint(0, rngs[i % len(rngs)], (1,)) for i in range(45)])
        t[k + ".randint_low"] = torch.cat([torch.randint(-7, 9, (1,)) for i in range(10)])
        t[k + ".random_int64"] = torch.stack([torch.empty((), dtype=torch.int64).random_() for _ in range(6)])
        for n in [1, 2, 5, 14, 100, 1000]:
            g = torch.Generator().manual_seed(seed * 7 + n)
            t[k + f".randperm{n}"] = torch.randperm(n, generator=g)
    write_safetensors(f"{OUT}/random_golden.safetensors", t, META)


# ---------------------------------------------------------------------------------------------
# 2. transforms
def make_inputs():
    rs = np.random.RandomState(7)
    imgs = {}
    for name, (w, h) in {"portrait": (40, 56), "landscape": (56, 40), "square": (48, 48)}.items():
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (w + h - 2)], -1)
        noise = rs.randint(-40, 41, size=(h, w, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        m = ((xx - w / 2) ** 2 / (w / 3) ** 2 + (yy - h / 2) ** 2 / (h / 3) ** 2 < 1).astype(np.float64) * 255
        m = np.clip(m + rs.randint(0, 60, size=(h, w)) * (m == 0) * (xx % 5 == 0), 0, 255).astype(np.uint8)
        imgs[name] = (img, m)
    return imgs


PIPELINES = {
    "human": [{"type": "HumanResizeCropFinalV3", "size": 512, "crop_p": 0.5}, {"type": "ToTensor"},
              {"type": "Normalize", "mean": [0.5], "std": [0.5]}, {"type": "ShuffleCaption", "keep_token_num": 1},
              {"type": "EnhanceText", "enhance_type": "human"}],
    "fill": [{"type": "ResizeFillMaskNew", "size": 512, "crop_p": 0.5, "scale_ratio": [0.5, 1.0]},
             {"type": "ToTensor"}, {"type": "Normalize", "mean": [0.5], "std": [0.5]},
             {"type": "ShuffleCaption", "keep_token_num": 0}, {"type": "EnhanceText", "enhance_type": "object"}],
    "flip": [{"type": "HumanResizeCropFinalV3", "size": 512, "crop_p": 1.0}, {"type": "PairRandomHorizontalFlip"},
             {"type": "ToTensor"}, {"type": "Normalize", "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]},
             {"type": "EnhanceText", "enhance_type": "style"}],
    "flip_first": [{"type": "PairRandomHorizontalFlip", "p": 0.7},
                   {"type": "ResizeFillMaskNew", "size": 512, "crop_p": 0.7, "scale_ratio": [0.4, 0.9]},
                   {"type": "ToTensor"}],
    "fill256": [{"type": "ResizeFillMaskNew", "size": 256, "crop_p": 0.5, "scale_ratio": [0.3, 0.5]},
                {"type": "ToTensor"}, {"type": "Normalize", "mean": [0.5], "std": [0.5]}],
}
PROMPT = "  <dog1> <dog2>,  a man in a red shirt , smiling,standing  , outdoors\u3000"


def gen_transforms():
    imgs = make_inputs()
    t, cases = {}, []
    for name, (img, m) in imgs.items():
        t[f"in.{name}.rgb"] = img
        t[f"in.{name}.mask"] = m
    # resize / cv2 unit checks on small sizes
    for name, (img, m) in imgs.items():
        for (ow, oh) in [(23, 31), (67, 90), (40, 57), (56, 20)]:
            t[f"resize.{name}.bilinear.{ow}x{oh}"] = np.array(Image.fromarray(img).resize((ow, oh), Image.BILINEAR))
            t[f"resize.{name}.nearest.{ow}x{oh}"] = np.array(Image.fromarray(img).resize((ow, oh), Image.NEAREST))
            t[f"resize.{name}.mask_bilinear.{ow}x{oh}"] = np.array(Image.fromarray(m).resize((ow, oh), Image.BILINEAR))
    rs = np.random.RandomState(3)
    for (w, h, ow, oh) in [(64, 64, 8, 8), (40, 48, 5, 6), (50, 50, 7, 7), (12, 10, 30, 25)]:
        src = rs.rand(h, w)
        t[f"cv.{w}x{h}.in"] = src
        t[f"cv.{w}x{h}.out"] = cv2.resize(src, (ow, oh), cv2.INTER_NEAREST)   # as the official call
    for pname, pipe in PIPELINES.items():
        seeds = [0, 1, 2, 3, 4, 5] if pname == "fill256" else [0, 1] if pname != "flip_first" else [3, 11]
        for name, (img, m) in imgs.items():
            for use_mask in ([True] if pname.startswith("flip") else [False, True]):
                for seed in seeds:
                    key = f"{pname}.{name}.{'m' if use_mask else 'n'}.{seed}"
                    random.seed(seed)
                    torch.manual_seed(seed)
                    tf = PairCompose([build_transform(o) for o in pipe])
                    kw = {"prompts": PROMPT}
                    if use_mask:
                        kw["mask"] = Image.fromarray(m)
                    case = {"key": key, "pipeline": pname, "image": name, "mask": use_mask, "seed": seed}
                    try:
                        out, kw = tf(Image.fromarray(img), **kw)
                    except Exception as e:  # the official code fails here: C must report an error
                        case["error"] = f"{type(e).__name__}: {e}"
                        cases.append(case)
                        continue
                    x = out.numpy().astype(np.float32)
                    case["prompt"] = kw["prompts"]
                    case["image_crc"] = crc(x)
                    t[key + ".image_sample"] = x.reshape(-1)[::STRIDE].copy()
                    if use_mask:
                        t[key + ".mask"] = kw["mask"].numpy()
                    im = kw["img_mask"].numpy()
                    assert (im.astype(np.float32).astype(np.float64) == im).all()   # k/4: exact in float32
                    t[key + ".img_mask"] = im.astype(np.float32)
                    case["next_random"] = random.random()
                    case["next_torch"] = str(int(torch.empty((), dtype=torch.int64).random_()))  # > 2^53
                    cases.append(case)
    write_safetensors(f"{OUT}/transform_golden.safetensors", t, META)
    json.dump({"meta": META, "prompt_in": PROMPT, "pipelines": PIPELINES, "stride": STRIDE, "cases": cases},
              open(f"{OUT}/transform_golden.json", "w"), indent=1, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# 3. LoraDataset + DataLoader
CONCEPT = f"{OUT}/concept"


def write_concept():
    rs = np.random.RandomState(11)
    for sub in ["image", "caption", "mask"]:
        os.makedirs(f"{CONCEPT}/{sub}", exist_ok=True)
    os.makedirs(f"{CONCEPT}/image/subdir", exist_ok=True)             # skipped: not a file
    open(f"{CONCEPT}/image/subdir/.keep", "w").close()
    open(f"{CONCEPT}/image/.DS_Store", "wb").write(b"\0\0\0\1Bud1")  # skipped by name
    specs = [("a_rgb", 40, 56, "RGB"), ("b_grey", 56, 40, "L"), ("c_rgba", 48, 48, "RGBA"),
             ("d.two.dots", 44, 60, "RGB"), ("e_grey16", 60, 36, "I;16")]
    captions = {"a_rgb": "<TOK>, a man, smiling ,  red shirt\nsecond line ignored\n",
                "b_grey": "a photo of <TOK>,grey\r\n", "c_rgba": "  <TOK>  with   many    spaces, \u00e9t\u00e9 ",
                "e_grey16": "<TOK>, sixteen bit"}           # d.two.dots has none: instance_prompt
    for name, w, h, mode in specs:
        yy, xx = np.mgrid[0:h, 0:w]
        if mode == "I;16":
            a = (rs.randint(0, 400, size=(h, w)) + xx * 3).astype(np.uint16)   # > 255 clips in convert
            Image.fromarray(a).save(f"{CONCEPT}/image/{name}.png")
        else:
            a = np.clip(np.stack([xx * 6, yy * 4, 255 - xx * 3, 128 + yy], -1) + rs.randint(-30, 31, size=(h, w, 4)), 0, 255).astype(np.uint8)
            im = Image.fromarray(a, "RGBA")
            im = im if mode == "RGBA" else im.convert(mode)
            im.save(f"{CONCEPT}/image/{name}.png")
        m = (((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (min(w, h) / 2.5) ** 2).astype(np.uint8) * 255
        mi = Image.fromarray(m)
        if name == "c_rgba":
            mi = Image.fromarray(np.stack([m, m // 2, m // 3], -1))            # RGB mask -> convert('L')
        mi.save(f"{CONCEPT}/mask/{name}.png")
        if name in captions:
            open(f"{CONCEPT}/caption/{name}.txt", "w", encoding="utf-8").write(captions[name])
    concept_list = [{"instance_prompt": "<TOK>", "instance_data_dir": f"{CONCEPT}/image",
                     "caption_dir": f"{CONCEPT}/caption", "mask_dir": f"{CONCEPT}/mask"}]
    json.dump(concept_list, open(f"{CONCEPT}/concept_list.json", "w"), indent=1)


LOADER_OPT = {"name": "LoraDataset", "concept_list": f"{CONCEPT}/concept_list.json", "use_caption": True,
              "use_mask": True, "instance_transform": PIPELINES["human"][:3] + [
                  {"type": "ShuffleCaption", "keep_token_num": 1}, {"type": "EnhanceText", "enhance_type": "human"}],
              "replace_mapping": {"<TOK>": "<dog1> <dog2>"}, "batch_size_per_gpu": 2, "dataset_enlarge_ratio": 3}


class LoggedDataset(LoraDataset):
    """The official dataset, recording which indices the loader asks for."""
    seen = []

    def __getitem__(self, i):
        LoggedDataset.seen.append(i)
        return super().__getitem__(i)


def lookahead(loader):
    """accelerate DataLoaderShard.__iter__ (single process): fetch batch k+1 before yielding k."""
    it = iter(loader)
    try:
        current = next(it)
    except StopIteration:
        return
    while True:
        try:
            nxt = next(it)
            yield current
            current = nxt
        except StopIteration:
            yield current
            break


def gen_loader():
    real_order = [x.name for x in Path(f"{CONCEPT}/image").iterdir()]
    orig_iterdir = Path.iterdir
    Path.iterdir = lambda self: iter(sorted(orig_iterdir(self), key=lambda p: p.name.encode()))
    runs = {}
    for mode in ["plain", "lookahead"]:
        random.seed(0)                       # accelerate.utils.set_seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        ds = LoggedDataset(LOADER_OPT)
        seen = LoggedDataset.seen
        seen.clear()
        listing = [{"image": os.path.basename(str(p)), "prompt": pr, "mask": os.path.basename(mk) if mk else None}
                   for p, pr, mk in ds.instance_images_path]
        loader = torch.utils.data.DataLoader(ds, batch_size=LOADER_OPT["batch_size_per_gpu"], shuffle=True, drop_last=True)
        batches = []
        n_batches = len(ds) // LOADER_OPT["batch_size_per_gpu"]
        for epoch in range(3):
            src = lookahead(loader) if mode == "lookahead" else loader
            for batch in src:
                b = len(batches)
                fetched = seen[:]
                seen.clear()
                batches.append({"epoch": epoch, "fetched_before": fetched, "prompts": batch["prompts"],
                                "images_crc": crc(batch["images"].numpy()), "masks_crc": crc(batch["masks"].numpy()),
                                "img_masks_crc": crc(batch["img_masks"].numpy()),
                                "image0_sample": batch["images"][0].numpy().reshape(-1)[::LOADER_STRIDE].tolist()})
                # what a training step draws between batches (stands in for noise, timesteps)
                batches[b]["step_rand"] = torch.rand(3).tolist()
                batches[b]["step_random"] = random.random()
        assert len(batches) == 3 * n_batches
        runs[mode] = {"listing": listing, "len": len(ds), "batches": batches}
    Path.iterdir = orig_iterdir
    json.dump({"meta": META, "option": LOADER_OPT, "readdir_order_seen": real_order,
               "listing_order": "sorted by name (Path.iterdir patched; readdir order depends on the file system)",
               "seed": 0, "stride": LOADER_STRIDE, "runs": runs},
              open(f"{OUT}/loader_golden.json", "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    gen_random()
    gen_transforms()
    write_concept()
    gen_loader()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total} bytes")
