"""Hostile safetensors/JSON files for tests/test_io.c, and a reference safetensors file with
every dtype written by common.py's pure-Python writer (values converted by torch).

    /usr/bin/python3 tools/ref/gen_bad_files.py

Writes tests/data/bad/*.{safetensors,json} and tests/data/bad/MANIFEST.txt (one line per file:
"<file> <word the error message must contain>"), and tests/data/io_reference.safetensors.
Every bad file must be refused with a message, never crash, under ASan/UBSan.
"""
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BAD = os.path.join(ROOT, "tests", "data", "bad")
os.makedirs(BAD, exist_ok=True)
manifest = []


def st(header, data=b"", n=None, pad=True):
    """A safetensors image from a header (dict or raw bytes) and data; n overrides the length."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def bad(name, blob, word):
    with open(os.path.join(BAD, name), "wb") as f:
        f.write(blob)
    manifest.append(f"{name} {word}")


def t(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


# ---- safetensors ---------------------------------------------------------------------------------
bad("st_empty.safetensors", b"", "short")
bad("st_7bytes.safetensors", b"\x08\x00\x00\x00\x00\x00\x00", "short")
bad("st_hlen_huge.safetensors", struct.pack("<Q", 2**63 + 5) + b"{}      ", "limit")
bad("st_hlen_over_cap.safetensors", struct.pack("<Q", 100_000_008) + b"{}      ", "limit")
bad("st_hlen_past_eof.safetensors", st({"a": t()}, b"\0" * 8, n=200), "follow")
bad("st_hlen_zero.safetensors", struct.pack("<Q", 0), "expected a value")
bad("st_not_json.safetensors", st(b"hello world"), "expected a value")
bad("st_json_array.safetensors", st(b"[1,2,3]"), "object")
bad("st_truncated_json.safetensors", st(b'{"a":{"dtype":"F32"'), "expected")
bad("st_bad_utf8.safetensors", st(b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8), "UTF-8")
bad("st_unknown_dtype.safetensors", st({"a": t("F4")}, b"\0" * 8), "dtype")
bad("st_missing_dtype.safetensors", st({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype")
bad("st_dtype_number.safetensors", st({"a": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype")
bad("st_shape_negative.safetensors", st({"a": t(shape=(-2,))}, b"\0" * 8), "negative")
bad("st_shape_fraction.safetensors", st({"a": t(shape=(1.5,))}, b"\0" * 8), "integer")
bad("st_shape_string.safetensors", st({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, b"\0" * 8), "integer")
bad("st_shape_overflow.safetensors", st({"a": t(shape=(2**53, 2**53, 2**53), offs=(0, 8))}, b"\0" * 8), "overflow")
bad("st_shape_bytes_overflow.safetensors", st({"a": t("F64", shape=(2**31, 2**31), offs=(0, 8))}, b"\0" * 8), "overflows")   # 64-bit: "byte size overflows", 32-bit size_t: "shape overflows size_t"
bad("st_9_dims.safetensors", st({"a": t(shape=(1,) * 9, offs=(0, 4))}, b"\0" * 4), "dimensions")
bad("st_offsets_reversed.safetensors", st({"a": t(offs=(8, 0))}, b"\0" * 8), "data_offsets")
bad("st_offsets_three.safetensors", st({"a": t(offs=(0, 8, 16))}, b"\0" * 8), "data_offsets")
bad("st_offsets_huge.safetensors", st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [1e30, 1e30 + 8]}}, b"\0" * 8), "integer")
bad("st_offsets_mismatch.safetensors", st({"a": t(offs=(0, 12))}, b"\0" * 12), "needs")
bad("st_offsets_past_eof.safetensors", st({"a": t(shape=(4,), offs=(0, 16))}, b"\0" * 8), "past the end")
bad("st_hole.safetensors", st({"a": t(offs=(0, 8)), "b": t(offs=(12, 20))}, b"\0" * 20), "tile")
bad("st_overlap.safetensors", st({"a": t(offs=(0, 8)), "b": t(offs=(4, 12))}, b"\0" * 12), "tile")
bad("st_not_from_zero.safetensors", st({"a": t(offs=(4, 12))}, b"\0" * 12), "tile")
bad("st_trailing_bytes.safetensors", st({"a": t()}, b"\0" * 9), "cover")
bad("st_duplicate_name.safetensors", st(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', b"\0" * 16), "duplicate")
bad("st_meta_not_string.safetensors", st({"__metadata__": {"k": 1}, "a": t()}, b"\0" * 8), "__metadata__")
bad("st_meta_array.safetensors", st({"__metadata__": ["k"], "a": t()}, b"\0" * 8), "__metadata__")
bad("st_entry_not_object.safetensors", st({"a": [1, 2]}, b"\0" * 8), "object")
bad("st_nul_in_name.safetensors", st(b'{"a\\u0000b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8), "NUL")
bad("st_deep_nesting.safetensors", st(b"[" * 5000 + b"]" * 5000), "nesting")
bad("st_trailing_garbage.safetensors", st(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}xyz'), "end of input")
bad("st_nul_padding.safetensors", st(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\0\0\0\0\0\0\0\0', b"\0" * 8, pad=False), "end of input")

# ---- JSON ----------------------------------------------------------------------------------------
J = {
    "json_empty.json": (b"", "expected a value"),
    "json_only_space.json": (b"  \n ", "expected a value"),
    "json_trailing_comma.json": (b'{"a": 1,}', "string key"),
    "json_trailing_comma_array.json": (b"[1, 2,]", "expected a value"),
    "json_leading_zero.json": (b"[01]", "expected ','"),
    "json_plus_number.json": (b"[+1]", "expected a value"),
    "json_dot_number.json": (b"[1.]", "digit"),
    "json_exp_number.json": (b"[1e]", "digit"),
    "json_huge_number.json": (b"[1e400]", "range"),
    "json_nan.json": (b"[NaN]", "expected a value"),
    "json_infinity.json": (b"[-Infinity]", "digit"),
    "json_single_quotes.json": (b"{'a': 1}", "string key"),
    "json_comment.json": (b'{"a": 1 /* c */}', "expected ','"),
    "json_unterminated.json": (b'{"a": "abc', "unterminated"),
    "json_control_char.json": (b'["a\x01b"]', "control"),
    "json_raw_newline.json": (b'["a\nb"]', "control"),
    "json_bad_escape.json": (b'["a\\qb"]', "escape"),
    "json_short_u.json": (b'["\\u12"]', "hex"),
    "json_lone_high.json": (b'["\\ud800x"]', "surrogate"),
    "json_lone_low.json": (b'["\\udc00"]', "surrogate"),
    "json_high_high.json": (b'["\\ud800\\ud800"]', "surrogate"),
    "json_overlong.json": (b'["\xc0\x80"]', "UTF-8"),
    "json_utf8_surrogate.json": (b'["\xed\xa0\x80"]', "UTF-8"),
    "json_utf8_too_big.json": (b'["\xf4\x90\x80\x80"]', "UTF-8"),
    "json_utf8_truncated.json": (b'["\xe2\x82"]', "UTF-8"),
    "json_latin1.json": (b'{"caf\xe9": 1}', "UTF-8"),
    "json_duplicate.json": (b'{\n  "lr": 1,\n  "steps": 2,\n  "lr": 3\n}', "duplicate key 'lr'"),
    "json_duplicate_many.json": (("{" + ",".join(f'"k{i}":{i}' for i in range(100)) + ',"k57":0}').encode(), "duplicate key 'k57'"),
    "json_deep.json": (b"[" * 257 + b"]" * 257, "nesting"),
    "json_two_values.json": (b'{"a":1} {"b":2}', "end of input"),
    "json_bad_literal.json": (b"[tru]", "true, false or null"),
    "json_missing_colon.json": (b'{"a" 1}', "':'"),
    "json_key_not_string.json": (b"{1: 2}", "string key"),
    "json_unclosed_array.json": (b"[1, 2", "']'"),
}
for name, (blob, word) in J.items():
    bad(name, blob, word)

with open(os.path.join(BAD, "MANIFEST.txt"), "w") as f:
    f.write("# file  word the error message must contain  (tools/ref/gen_bad_files.py)\n")
    f.write("\n".join(manifest) + "\n")

# ---- reference file: every dtype, conversions done by torch -----------------------------------------
edges = [0.0, -0.0, 1.0, -1.0, 0.1, 1.0 / 3, 65504.0, 65519.0, 65519.996, 65520.0, 65536.0, 1e6, -1e6,
         2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -26, 1.5 * 2.0 ** -24, 2.5 * 2.0 ** -24,
         2.0 ** -14 - 2.0 ** -25, 1e-8, 1e-45, 3.4028235e38, -3.4028235e38, 1.17549435e-38,
         1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20,         # f16 ties: to even, up, above
         1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -20,            # bf16 ties
         3.3895314e38, 3.3961776e38, float("inf"), float("-inf"), float("nan"), -float("nan")]
rng = np.random.default_rng(7)
edges += list(rng.standard_normal(40) * 10.0 ** rng.integers(-9, 6, 40))
f32 = torch.tensor(edges, dtype=torch.float32)
f16_all = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
f64 = torch.tensor([0.1, -0.0, 1e308, -1e308, 5e-324, 1e-40, 3.4028235677973366e38, 1 / 3, 2.0 ** 24 + 1,
                    float("inf"), float("nan")], dtype=torch.float64)
i64 = torch.tensor([0, 1, -1, 2**24 + 1, -(2**24 + 3), 2**62 + 2**39 + 1, 2**63 - 1, -2**63], dtype=torch.int64)
i32 = torch.tensor([0, 7, -7, 2**31 - 1, -2**31, 16777217, 123456789], dtype=torch.int32)
tensors = {
    "f32_edges": f32,
    "f32_edges.f16": f32.half(),                 # torch: round to nearest even
    "f32_edges.bf16": f32.bfloat16(),
    "f16_all": f16_all,                          # every binary16 bit pattern
    "f16_all.f32": f16_all.float(),
    "f64": f64, "f64.f32": f64.float(),
    "i64": i64, "i64.f32": i64.float(),
    "i32": i32, "i32.f32": i32.float(),
    "i16": torch.tensor([-32768, -1, 0, 32767], dtype=torch.int16),
    "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
    "u8": torch.arange(256, dtype=torch.int32).to(torch.uint8),
    "bool": torch.tensor([True, False, False, True, True]),
    "scalar": torch.tensor(2.5, dtype=torch.float32),
    "empty": torch.zeros(0, 3, dtype=torch.float32),
    "ünïcødé.wéight": torch.tensor([1.0, 2.0], dtype=torch.float32),
    'we"ird\\name\n\t\x01/': torch.tensor([3.0], dtype=torch.float32),
}
meta = {"format": "pt", "script": "tools/ref/gen_bad_files.py", "torch": torch.__version__,
        "note": 'ünï "quoted" \\ \n\t \x01 \x7f 😀 /'}
n = common.write_safetensors(os.path.join(ROOT, "tests", "data", "io_reference.safetensors"), tensors, meta)
print(f"{len(manifest)} bad files in {BAD}; io_reference.safetensors {n} bytes")
