#!/usr/bin/python3
"""Writes the PyTorch checkpoint goldens of tests/test_pytorch.c (run from the repo root):

  tests/data/pth/<name>.pth          written by torch.save itself
  tests/data/pth/<name>.expect.txt   one line per tensor: name dtype requires_grad ndim shape...
                                      raw_offset raw_bytes f32_offset   (offsets into .expect.bin)
  tests/data/pth/<name>.expect.bin   the tensor values, row-major contiguous: raw bytes in their
                                      own dtype, and as float32 (torch's .float())
  tests/data/bad/pth/*.pth           hostile or broken files that the reader must refuse

Names are the reader's dotted paths through dicts (list/tuple items by index).
Run with Debian's /usr/bin/python3 (python3-torch 1.13). Deterministic: seed 1234.
"""
import collections, io, os, pickle, struct, sys, zipfile, zlib
import torch

OUT = "tests/data/pth"
BAD = "tests/data/bad/pth"
DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
      torch.uint8: "U8", torch.bool: "BOOL"}


class Callback:
    """Stands for the pytorch_lightning objects some training .ckpt files carry."""
    def __init__(self):
        self.best_score, self.monitor = 0.25, "val/loss"


def flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out.append((prefix, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


def save_golden(name, obj, **kw):
    path = f"{OUT}/{name}.pth"
    torch.save(obj, path, **kw)
    tensors = []
    flatten(obj, "", tensors)
    lines, blob = [f"# {name}.pth: torch {torch.__version__}, seed 1234, gen_pth_golden.py"], bytearray()
    for n, t in tensors:
        assert " " not in n
        raw = t.detach().contiguous()
        rawb = raw.view(torch.uint8).numpy().tobytes() if raw.dim() and raw.numel() else \
            raw.reshape(-1).view(torch.uint8).numpy().tobytes()
        f32 = t.detach().float().contiguous().numpy().tobytes()
        lines.append(" ".join([n or '""', DT[t.dtype], str(int(t.requires_grad)), str(t.dim())] +
                              [str(s) for s in t.shape] + [str(len(blob)), str(len(rawb)),
                                                           str(len(blob) + len(rawb))]))
        blob += rawb + f32
    open(f"{OUT}/{name}.expect.txt", "w").write("\n".join(lines) + "\n")
    open(f"{OUT}/{name}.expect.bin", "wb").write(bytes(blob))
    return path


def main():
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(BAD, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    rn = lambda *s: torch.randn(*s, generator=g)

    # every dtype, 0-dim and empty tensors, non-tensor values that are skipped, a Parameter
    special = torch.tensor([0.0, -0.0, 1e-8, 6.1e-5, 65504.0, 1e30, float("inf"), float("-inf"),
                            float("nan"), 3.14159])
    basic = {
        "meta": {"step": 1000, "lr": 1e-4, "name": "basic", "flags": [True, None], "big": 2**62},
        "f32": rn(3, 5), "f16": torch.cat([special, rn(6)]).half(), "bf16": torch.cat([special, rn(6)]).bfloat16(),
        "f64": rn(2, 3).double(), "i64": torch.tensor([0, -1, 2**40, -2**40, 7]),
        "i32": torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
        "i16": torch.tensor([-32768, 5], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "five_d": rn(1, 2, 1, 3, 2),
        "param": torch.nn.Parameter(rn(4)),
        "list": [rn(2), (rn(1, 2), "x")],
        7: rn(2),
    }
    save_golden("basic", basic)

    # Mix-of-Show ED-LoRA layout: params -> new_concept_embedding / text_encoder / unet,
    # requires_grad=True tensors as its training loop leaves them
    D, r = 32, 4
    te = {}
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            k = f"text_model.encoder.layers.{i}.self_attn.{p}"
            te[k + ".lora_down.weight"] = rn(r, D).requires_grad_()
            te[k + ".lora_up.weight"] = torch.zeros(D, r).requires_grad_()
    un = {}
    for p in ("to_q", "to_k", "to_v", "to_out.0"):
        k = f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.{p}"
        un[k + ".lora_down.weight"] = rn(r, 16 if p != "to_k" else D).requires_grad_()
        un[k + ".lora_up.weight"] = rn(16, r).requires_grad_()
    edlora = {"params": {"new_concept_embedding": {"<cat1>": rn(16, D).requires_grad_(),
                                                   "<cat2>": rn(16, D).requires_grad_()},
                         "text_encoder": te, "unet": un}}
    save_golden("edlora", edlora)

    # views sharing one storage: offsets, non-contiguous strides
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"full": base, "row": base[1], "col": base[:, 2], "T": base.t(), "slice": base[1:3, 2:5],
             "step": base[::2, ::3], "h": torch.arange(10).half()[3:8]}
    save_golden("views", views)

    # an OrderedDict state_dict with _metadata (BUILD), and pickle protocol 4
    # (FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL are exercised)
    torch.manual_seed(1234)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    save_golden("state_dict", net.state_dict())
    save_golden("proto4", {"a": rn(2, 2), "b": {"c": rn(3).half()}}, pickle_protocol=4)
    save_golden("flat_tensor", rn(3, 2))   # the root object is a tensor: its name is ""

    # the same members deflated (torch never does this, zip tools may)
    with zipfile.ZipFile(f"{OUT}/proto4.pth") as zi, zipfile.ZipFile(f"{OUT}/deflated.pth", "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))
    os.system(f"cp {OUT}/proto4.expect.txt {OUT}/deflated.expect.txt; cp {OUT}/proto4.expect.bin {OUT}/deflated.expect.bin")

    # a training checkpoint with objects outside the allow-list: strict refuses, lenient reads
    import numpy as np
    save_golden("lenient", {"state_dict": {"w": rn(2, 3), "b": rn(3).half()}, "global_step": np.int64(7),
                            "callbacks": {"cb": Callback()}, "epoch": 3})

    # legacy format: refused with a clear message
    torch.save({"a": rn(2)}, f"{OUT}/legacy.pth", _use_new_zipfile_serialization=False)

    make_bad()


def torch_zip(pkl, records=(), name="archive"):
    """A torch-shaped zip with the given data.pkl bytes and data records (stored)."""
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", pkl)
        for k, v in records:
            z.writestr(f"{name}/data/{k}", v)
        z.writestr(f"{name}/version", "3\n")
    return b.getvalue()


def make_bad():
    w = lambda n, d: open(f"{BAD}/{n}", "wb").write(d)
    # hostile pickles (each alone would run code under pickle.load)
    w("global_os_system.pth", torch_zip(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R."))
    w("reduce_builtins_eval.pth", torch_zip(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"
                                             b"\x8c\x08builtins\x8c\x04eval\x93\x8c\x041+1\x85R."))
    w("posix_system_newobj.pth", torch_zip(b"\x80\x02cposix\nsystem\n)\x81."))
    w("memo_out_of_range.pth", torch_zip(b"\x80\x02}q\x00h\x05."))
    w("huge_long_binput.pth", torch_zip(b"\x80\x02}r\xff\xff\xff\xff."))
    w("deep_mark.pth", torch_zip(b"\x80\x02" + b"(" * 5000 + b"."))
    w("recursive_list.pth", torch_zip(b"\x80\x02]q\x00h\x00a."))   # l = [l]
    w("long_string.pth", torch_zip(b"\x80\x02X\xff\xff\xff\x7fabc."))
    w("no_stop.pth", torch_zip(b"\x80\x02}q\x00"))
    # a valid tensor pickle whose record is too short / view runs past the storage
    pk = pickle.dumps  # noqa (kept for readers: the bytes below are what torch.save writes)
    good = open(f"{OUT}/proto4.pth", "rb").read()
    with zipfile.ZipFile(f"{OUT}/basic.pth") as z:
        pkl = z.read("basic/data.pkl")
    w("storage_too_short.pth", torch_zip(pkl, [(str(i), b"\x00" * 2) for i in range(40)]))
    w("missing_record.pth", torch_zip(pkl))
    # zip damage
    w("truncated.pth", good[: len(good) // 2])
    w("not_a_zip.pth", b"hello, this is not a checkpoint at all" * 3)
    d = bytearray(good)
    i = d.find(b"FB")                      # first data record after data.pkl's header
    j = d.find(b"PK\x03\x04", 4)           # second local header: data/0
    k = d.find(b"FB", j) + 2
    k += 2 + struct.unpack("<H", d[k:k + 2])[0]
    d[k] ^= 0x55                           # flip bits in the first tensor's data
    w("crc_mismatch.pth", bytes(d))
    d = bytearray(good)                    # zip64 end record: central directory past EOF
    z64 = d.rfind(b"PK\x06\x06")
    d[z64 + 48:z64 + 56] = struct.pack("<Q", 1 << 40)
    w("zip64_cd_past_eof.pth", bytes(d))
    w("zip64_member_past_eof.pth", zip64_member(1 << 40))
    # deflate bombs: a member that claims 1 KiB and inflates to 8 MiB, and one claiming 1 TiB
    w("deflate_bomb_lie.pth", deflated_member(b"\x00" * (8 << 20), claim=1024))
    w("deflate_bomb_ratio.pth", deflated_member(b"\x00" * 4096, claim=1 << 40))


def zip64_member(size):
    """One stored member with zip64 extra fields that say `size` bytes (the file is tiny)."""
    name, data = b"archive/data.pkl", b"\x80\x02}."
    crc = zlib.crc32(data)
    lx = struct.pack("<HHQQ", 1, 16, size, size)
    lh = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(lx))
    cx = struct.pack("<HHQQ", 1, 16, size, size)
    ch = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                     len(name), len(cx), 0, 0, 0, 0, 0)
    body = lh + name + lx + data
    cd = ch + name + cx
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), len(body), 0)
    return body + cd + eocd


def deflated_member(raw, claim):
    name = b"archive/data.pkl"
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    comp = c.compress(raw) + c.flush()
    crc = zlib.crc32(raw) & 0xFFFFFFFF
    if claim >= 1 << 32:
        lx = struct.pack("<HHQQ", 1, 16, claim, len(comp)); usz, csz = 0xFFFFFFFF, 0xFFFFFFFF
    else:
        lx = b""; usz, csz = claim, len(comp)
    lh = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, crc, csz, usz, len(name), len(lx))
    ch = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0x21, crc, csz, usz,
                     len(name), len(lx), 0, 0, 0, 0, 0)
    body = lh + name + lx + comp
    cd = ch + name + lx
    return body + cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), len(body), 0)


if __name__ == "__main__":
    main()
