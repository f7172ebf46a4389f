"""Helpers shared by the tools/ref/ scripts that write golden files (run with /usr/bin/python3).

write_safetensors() is a small pure-Python writer that follows the safetensors format and the
layout of the reference writer (huggingface/safetensors, Rust `prepare`):
  - tensors sorted by DEcreasing dtype alignment (the order of the Rust Dtype enum), then name;
  - header = compact JSON, "__metadata__" first (insertion order of the dict given), then the
    tensors in data order, each {"dtype","shape","data_offsets"}; non-ASCII written as UTF-8;
  - header padded with spaces to a multiple of 8 bytes; u64 little-endian length in front.
tests/test_io.c checks that mixshow's C writer produces the same bytes.
read_safetensors() reads such a file back (used to verify what was written).
"""
import json
import struct
import sys

import numpy as np

# Rust safetensors Dtype enum order (increasing alignment) and element sizes.
DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
          "I32", "U32", "F32", "F64", "I64", "U64"]
NUMPY_OF = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
            "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "U32": np.uint32,
            "F32": np.float32, "F64": np.float64, "I64": np.int64, "U64": np.uint64}
DTYPE_OF_NUMPY = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
                  np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
                  np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32",
                  np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64"}


def as_entry(value):
    """(dtype name, shape, little-endian bytes) of a numpy array, a torch tensor or a
    (dtype_name, numpy array of raw values) pair (use ("BF16", uint16 bits))."""
    if isinstance(value, tuple):
        dtype, arr = value
        arr = np.asarray(arr, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        return dtype, list(arr.shape), arr.astype(np.dtype(NUMPY_OF[dtype]).newbyteorder("<")).tobytes()
    try:
        import torch
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                return "BF16", list(t.shape), t.view(torch.int16).numpy().astype("<i2").tobytes()
            value = t.numpy()
    except ImportError:
        pass
    arr = np.asarray(value, order="C")
    dtype = DTYPE_OF_NUMPY[arr.dtype]
    return dtype, list(arr.shape), arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def safetensors_bytes(tensors, metadata=None):
    """The file image of {name: value} (see as_entry) with an optional {str: str} metadata."""
    entries = [(name,) + as_entry(v) for name, v in tensors.items()]
    entries.sort(key=lambda e: (-DTYPES.index(e[1]), e[0].encode("utf-8")))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(e[3] for e in entries)


def write_safetensors(path, tensors, metadata=None):
    blob = safetensors_bytes(tensors, metadata)
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    import os
    os.replace(path + ".tmp", path)
    return len(blob)


def read_safetensors(path):
    """{name: numpy array} (BF16 as uint16 bits), metadata dict."""
    blob = open(path, "rb").read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    out, data = {}, blob[8 + n:]
    for name, info in header.items():
        b, e = info["data_offsets"]
        dt = np.dtype(NUMPY_OF[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(data[b:e], dtype=dt).reshape(info["shape"])
    return out, meta


def versions():
    """Metadata entries naming the software that produced a golden file."""
    import torch
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}


def stub_diffusers(src, subpackages):
    """Make `import diffusers.<sub>.<module>` work from the diffusers 0.19.3 source tree `src`
    (its src/ folder) without running diffusers' package __init__, which needs packages Debian
    does not have (huggingface_hub, requests, tqdm, packaging): those are stubbed, and the
    package modules diffusers and diffusers.<sub> are registered with their source paths.
    Nothing of diffusers is copied; see the scripts' headers for how to recreate the tree."""
    import os, re, tempfile, types

    def stub(name, **attrs):
        m = types.ModuleType(name); m.__dict__.update(attrs); m.__path__ = []
        m.__getattr__ = lambda a: (_ for _ in ()).throw(AttributeError(a)) if a.startswith("__") \
            else type(a, (Exception,), {})
        sys.modules[name] = m
        return m

    class V:
        def __init__(self, s): self.t = tuple(int(x) for x in re.findall(r"\d+", str(s))[:3])
        def __lt__(a, b): return a.t < b.t
        def __le__(a, b): return a.t <= b.t
        def __gt__(a, b): return a.t > b.t
        def __ge__(a, b): return a.t >= b.t
        def __eq__(a, b): return a.t == b.t
        base_version = property(lambda self: ".".join(map(str, self.t)))
    for name in ["huggingface_hub", "huggingface_hub.utils", "huggingface_hub.file_download",
                 "huggingface_hub.constants", "requests", "tqdm", "tqdm.auto"]:
        stub(name)
    sys.modules["huggingface_hub.constants"].HUGGINGFACE_HUB_CACHE = tempfile.gettempdir()
    sys.modules["huggingface_hub.constants"].hf_cache_home = tempfile.gettempdir()
    sys.modules["huggingface_hub.utils"].validate_hf_hub_args = lambda f: f
    stub("packaging").version = stub("packaging.version", parse=V, Version=V)
    for pkg, sub in [("diffusers", "diffusers")] + [("diffusers." + s, "diffusers/" + s) for s in subpackages]:
        m = types.ModuleType(pkg); m.__path__ = [os.path.join(src, sub)]; m.__version__ = "0.19.3"
        sys.modules[pkg] = m
