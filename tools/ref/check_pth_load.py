#!/usr/bin/python3
"""Checks that torch.load(..., weights_only=True) reads the file tests/test_pytorch.c writes
with pth_save (default build/test_pytorch_roundtrip.pth), and that every value is what the C
test put there. The C test's random values come from ms_rng (splitmix64 + Box-Muller in double,
tensor.c), re-computed here. Run by hand after the test: /usr/bin/python3 tools/ref/check_pth_load.py
"""
import math, sys, zipfile
import numpy as np
import torch

M64 = (1 << 64) - 1


class MsRng:
    def __init__(self, seed): self.s = seed
    def u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)
    def uniform(self): return (self.u64() >> 11) * (1.0 / 9007199254740992.0)
    def normal(self):
        u1, u2 = self.uniform(), self.uniform()
        u1 = max(u1, 1e-300)
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * 3.14159265358979323846 * u2)
    def fill_normal(self, n, mean, std):
        std = float(np.float32(std))
        return np.array([np.float32(mean + std * self.normal()) for _ in range(n)], dtype=np.float32)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "build/test_pytorch_roundtrip.pth"
    names = zipfile.ZipFile(path).namelist()
    print("members:", names)
    sd = torch.load(path, weights_only=True)
    r = MsRng(7)
    a = r.fill_normal(30, 0.0, 1.0)
    emb = r.fill_normal(128, 0.0, 0.02)
    p = sd["params"]
    want = {
        ("params", "new_concept_embedding", "<dog1>"): (p["new_concept_embedding"]["<dog1>"], emb.reshape(16, 8), True),
        ("params", "unet", "down_blocks.0.attn2.to_k.lora_down.weight"):
            (p["unet"]["down_blocks.0.attn2.to_k.lora_down.weight"], a.reshape(6, 5), True),
        ("params", "unet", "x.lora_up.weight"): (p["unet"]["x.lora_up.weight"], a.reshape(1, 5, 6), False),
        ("ids",): (sd["ids"], np.array([0, -1, 255, 256, 65536, -2147483649, 4611686018427387904]), False),
        ("half",): (sd["half"], np.array([0x3c00, 0x8001, 0x7bff], dtype=np.uint16).view(np.float16), True),
        ("mask",): (sd["mask"], np.array([[True, False], [False, True]]), False),
        ("d",): (sd["d"], np.array([1.0 / 3.0, -1e300]), False),
        ("scalar",): (sd["scalar"], a[:1].reshape(()), False),
        ("empty",): (sd["empty"], np.zeros((0, 3), np.float32), False),
    }
    bad = 0
    for k, (t, w, rg) in want.items():
        got = t.detach().numpy()
        same = t.shape == w.shape and t.requires_grad == rg and \
            got.tobytes() == np.ascontiguousarray(w).astype(got.dtype).tobytes()
        print(f"{'ok  ' if same else 'FAIL'} {'.'.join(k):60s} {str(t.dtype):14s} {tuple(t.shape)} requires_grad={t.requires_grad}")
        bad += not same
    keys = {("params", "new_concept_embedding", "<dog1>"), ("params", "unet", "x.lora_up.weight")}
    top = sorted(sd.keys()) == sorted(["params", "ids", "half", "mask", "d", "scalar", "empty"]) and \
        sorted(p.keys()) == ["new_concept_embedding", "unet"] and len(p["unet"]) == 2
    print(f"{'ok  ' if top else 'FAIL'} nesting: exactly the keys written, no others")
    bad += not top
    # the forced-zip64 archive of the same test, read by Python's own zip reader
    z64 = path.replace("roundtrip.pth", "z64.zip")
    try:
        z = zipfile.ZipFile(z64)
        data = bytes((i * 7) & 255 for i in range(300))
        ok = z.namelist() == ["a/x", "a/y", "a/empty"] and z.read("a/x") == data and \
            z.read("a/y") == data[:1] and z.read("a/empty") == b"" and z.testzip() is None
    except (OSError, zipfile.BadZipFile) as e:
        ok = False
        print(e)
    print(f"{'ok  ' if ok else 'FAIL'} {z64}: zip64 fields read by Python's zipfile, CRCs good")
    bad += not ok
    n = len(want) + 2
    print(f"check_pth_load: {n - bad} passed, {bad} failed (torch {torch.__version__}, weights_only=True)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
