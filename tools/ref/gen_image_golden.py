#!/usr/bin/python3
"""tools/ref/gen_image_golden.py — reference data for tests/test_images.c.

Writes into tests/data/images/ (run from the repository root with /usr/bin/python3):
  * small synthetic PNGs: every colour type and bit depth, Adam7, palette + tRNS, 16-bit,
    every filter type (rows cycle through filters 0..4), split IDATs; written by the small PNG
    writer below (Pillow cannot write interlaced, 2/4-bit grey or 16-bit colour PNGs) and by
    Pillow itself;
  * small synthetic JPEGs: Pillow (libjpeg-turbo) baseline 4:4:4 / 4:2:2 / 4:2:0, grey,
    progressive; cjpeg (libjpeg-turbo-progs) for restart intervals, 16-bit DQT, 4:4:0, 4:1:1,
    Adobe RGB, non-interleaved sequential scans, tiny sizes;
  * for each (file, channels, depth) the pixels Pillow decodes, raw (uint8, or uint16
    little-endian), listed in manifest.txt:  file channels depth w h ref.raw kind
    (kind: exact for PNG, jpeg for +-1);
  * shared_manifest.txt: every PNG/JPEG under /work/shared/mixofshow-data with Pillow's
    size, mode and the CRC-32 and byte sum of its pixels (exact check for PNG); for the two
    JPEGs the Pillow pixels are stored as lossless PNGs (ref_*.png, ~0.2 MB each), which the
    C test decodes with the PNG decoder (itself checked exactly against Pillow) and compares
    +-1 sample by sample: enough to count every differing sample, not only a digest.
Writes into tests/data/bad/images/: hostile PNG/JPEG files and raw deflate/zlib streams
(.deflate/.zlib) that every decoder must refuse with a message.

Everything is deterministic (numpy seed 1234). Pillow decodes everything, so the reference
pixels come from libpng-free Pillow PNG code and libjpeg-turbo, independent of our C.
"""
import io, os, struct, subprocess, sys, zlib, glob, shutil, tempfile
import numpy as np
from PIL import Image, features
import PIL

OUT = "tests/data/images"
BAD = "tests/data/bad/images"
SHARED = "/work/shared/mixofshow-data"
rng = np.random.default_rng(1234)
manifest = []


# ---------------------------------------------------------------------------------------------
# A small PNG writer (all colour types, depths, Adam7, cycling filters, split IDAT)
# ---------------------------------------------------------------------------------------------
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def pack_row(samples, depth):
    if depth == 16:
        return b"".join(struct.pack(">H", int(v)) for v in samples)
    if depth == 8:
        return bytes(int(v) for v in samples)
    out, acc, n = bytearray(), 0, 0
    for v in samples:
        acc = (acc << depth) | int(v)
        n += depth
        if n == 8:
            out.append(acc); acc = 0; n = 0
    if n:
        out.append(acc << (8 - n))
    return bytes(out)


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(ft, row, prev, bpp):
    out = bytearray(len(row))
    for i in range(len(row)):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i] if prev is not None else 0
        c = prev[i - bpp] if (prev is not None and i >= bpp) else 0
        pred = [0, a, b, (a + b) >> 1, paeth(a, b, c)][ft]
        out[i] = (row[i] - pred) & 255
    return bytes([ft]) + bytes(out)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def write_png(path, px, ctype, depth, palette=None, trns=None, interlace=0, idat_split=0):
    """px: (h, w, nch) integer samples at the file depth."""
    h, w, nch = px.shape
    bpp = max(1, nch * depth // 8)
    raw = bytearray()
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    for pi, (x0, y0, dx, dy) in enumerate(passes):
        sub = px[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        prev = None
        for y in range(sub.shape[0]):
            row = pack_row(sub[y].reshape(-1), depth)
            raw += filter_row((y + pi) % 5, row, prev, bpp)
            prev = row
    z = zlib.compress(bytes(raw), 9)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace))
    data += chunk(b"tEXt", b"Comment\x00mixshow test image")
    if palette is not None:
        data += chunk(b"PLTE", bytes(np.asarray(palette, dtype=np.uint8).reshape(-1)))
    if trns is not None:
        data += chunk(b"tRNS", trns)
    if idat_split:
        for k in range(0, len(z), idat_split):
            data += chunk(b"IDAT", z[k:k + idat_split])
    else:
        data += chunk(b"IDAT", z)
    data += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)
    return data


def samples(h, w, nch, depth):
    """Gradients plus noise, so every filter type and every value range shows up."""
    maxv = (1 << depth) - 1
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 37 + y * 11 + c * 50) for c in range(nch)], -1).astype(np.int64)
    noise = rng.integers(0, maxv + 1, size=(h, w, nch))
    mix = np.where(rng.random((h, w, nch)) < 0.3, noise, base * max(1, maxv // 255) % (maxv + 1))
    mix[0, 0] = 0
    mix[-1, -1] = maxv
    return mix.astype(np.int64)


def ref_pixels(path, want_ch, depth):
    im = Image.open(path)
    if depth == 16:
        assert want_ch == 1
        a = np.array(im).astype(np.uint16)       # mode I (16-bit grey)
        return a, im.size
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[want_ch]
    return np.array(im.convert(mode)).astype(np.uint8), im.size


def add_ref(fname, want_ch, depth, kind):
    a, (w, h) = ref_pixels(os.path.join(OUT, fname), want_ch, depth)
    ref = "%s.c%dd%d.raw" % (os.path.splitext(fname)[0], want_ch, depth)
    with open(os.path.join(OUT, ref), "wb") as f:
        f.write(a.astype("<u2").tobytes() if depth == 16 else a.tobytes())
    manifest.append("%s %d %d %d %d %s %s" % (fname, want_ch, depth, w, h, ref, kind))


def gen_png():
    cases = []   # (name, w, h, ctype, depth, interlace, palette_n, trns)
    for d in (1, 2, 4, 8, 16):
        cases.append(("png_g%d" % d, 17, 13, 0, d, 0, 0, None))
    for d in (1, 4, 16):
        cases.append(("png_g%di" % d, 17, 13, 0, d, 1, 0, None))
    for d in (8, 16):
        cases += [("png_rgb%d" % d, 17, 13, 2, d, 0, 0, None), ("png_rgb%di" % d, 19, 11, 2, d, 1, 0, None),
                  ("png_ga%d" % d, 13, 9, 4, d, 0, 0, None), ("png_rgba%d" % d, 15, 10, 6, d, 0, 0, None),
                  ("png_rgba%di" % d, 21, 17, 6, d, 1, 0, None)]
    cases.append(("png_ga8i", 10, 10, 4, 8, 1, 0, None))
    for d in (1, 2, 4, 8):
        cases.append(("png_p%d" % d, 17, 13, 3, d, 0, 1 << d, None))
    cases += [("png_p8t", 17, 13, 3, 8, 0, 200, "pal"), ("png_p4ti", 17, 13, 3, 4, 1, 12, "pal"),
              ("png_g8t", 17, 13, 0, 8, 0, 0, "grey"), ("png_rgb8t", 17, 13, 2, 8, 0, 0, "rgb"),
              ("png_1x1", 1, 1, 2, 8, 0, 0, None), ("png_1x1i", 1, 1, 6, 8, 1, 0, None),
              ("png_3x40i", 3, 40, 2, 8, 1, 0, None), ("png_40x2i", 40, 2, 0, 2, 1, 0, None)]
    for name, w, h, ct, d, il, npal, trns in cases:
        nch = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ct]
        pal = None
        tr = None
        if ct == 3:
            px = rng.integers(0, npal, size=(h, w, 1))
            pal = rng.integers(0, 256, size=(npal, 3))
            if trns == "pal":
                tr = bytes(rng.integers(0, 256, size=npal // 2).astype(np.uint8))
        else:
            px = samples(h, w, nch, d)
            if trns == "grey":
                px[2:5, 3:7, 0] = 77
                tr = struct.pack(">H", 77)
            elif trns == "rgb":
                px[2:5, 3:7] = (10, 200, 30)
                tr = struct.pack(">HHH", 10, 200, 30)
        fname = name + ".png"
        write_png(os.path.join(OUT, fname), px, ct, d, pal, tr, il, idat_split=37 if name == "png_rgb8" else 0)
        if ct == 0 and d == 16:
            add_ref(fname, 1, 16, "exact")
            continue
        for ch in ((1, 3, 4) if ct in (0, 4) else (3, 4) if ct == 3 else (1, 2, 3, 4) if name == "png_rgba8" else (3, 4)):
            add_ref(fname, ch, 8, "exact")
    # Pillow's own encoder
    a = samples(21, 33, 4, 8).astype(np.uint8)
    Image.fromarray(a, "RGBA").save(os.path.join(OUT, "pil_rgba.png"))
    Image.fromarray(a[:, :, :3], "RGB").quantize(16).save(os.path.join(OUT, "pil_p.png"), transparency=3)
    Image.fromarray(a[:, :, 0], "L").save(os.path.join(OUT, "pil_l.png"), optimize=True)
    Image.fromarray(a[:, :, 0] > 128).save(os.path.join(OUT, "pil_1.png"))
    for f, chs in (("pil_rgba.png", (1, 3, 4)), ("pil_p.png", (3, 4)), ("pil_l.png", (1, 3)), ("pil_1.png", (1, 3))):
        for ch in chs:
            add_ref(f, ch, 8, "exact")


# ---------------------------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------------------------
def photo(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    g = 128 + 90 * np.cos((x + y) / 6.0)
    b = (x * 255.0 / max(1, w - 1))
    a = np.stack([r, g, b], -1) + rng.normal(0, 12, size=(h, w, 3))
    a[h // 3:h // 2, w // 4:w // 2] = (250, 20, 40)     # a hard edge
    return np.clip(a, 0, 255).astype(np.uint8)


def cjpeg(name, w, h, args, grey=False):
    a = photo(h, w)
    tmp = tempfile.NamedTemporaryFile(suffix=".ppm", delete=False)
    im = Image.fromarray(a, "RGB")
    (im.convert("L") if grey else im).save(tmp.name)
    out = os.path.join(OUT, name)
    subprocess.run(["cjpeg"] + args + ["-outfile", out, tmp.name], check=True)
    os.unlink(tmp.name)


def gen_jpeg():
    jp = []
    for name, w, h, kw in (("pil_444.jpg", 17, 13, dict(quality=90, subsampling=0)),
                           ("pil_422.jpg", 33, 17, dict(quality=85, subsampling=1)),
                           ("pil_420.jpg", 35, 21, dict(quality=75, subsampling=2)),
                           ("pil_420_big.jpg", 128, 96, dict(quality=95, subsampling=2)),
                           ("pil_prog420.jpg", 40, 24, dict(quality=80, progressive=True, subsampling=2)),
                           ("pil_prog444.jpg", 23, 29, dict(quality=92, progressive=True, optimize=True, subsampling=0))):
        Image.fromarray(photo(h, w), "RGB").save(os.path.join(OUT, name), **kw)
        jp.append((name, (1, 3)))
    Image.fromarray(photo(11, 19)[:, :, 1], "L").save(os.path.join(OUT, "pil_grey.jpg"), quality=88)
    jp.append(("pil_grey.jpg", (1, 3)))
    scans = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    scans.write("0;\n1;\n2;\n")
    scans.close()
    for name, w, h, args, grey in (("cj_rst420.jpg", 37, 29, ["-restart", "1B", "-sample", "2x2"], False),
                                   ("cj_rst_prog.jpg", 37, 29, ["-progressive", "-restart", "2B"], False),
                                   ("cj_rst_rows.jpg", 50, 40, ["-restart", "1", "-sample", "2x1"], False),
                                   ("cj_q16.jpg", 24, 16, ["-quality", "3"], False),
                                   ("cj_440.jpg", 30, 22, ["-sample", "1x2"], False),
                                   ("cj_411.jpg", 45, 17, ["-sample", "4x1"], False),
                                   ("cj_rgb.jpg", 20, 12, ["-rgb"], False),
                                   ("cj_grey_prog.jpg", 27, 18, ["-grayscale", "-progressive"], True),
                                   ("cj_tiny420.jpg", 3, 5, ["-sample", "2x2"], False),
                                   ("cj_nonint420.jpg", 37, 29, ["-sample", "2x2", "-scans", scans.name], False)):
        cjpeg(name, w, h, args, grey)
        jp.append((name, (1, 3)))
    os.unlink(scans.name)
    data = open(os.path.join(OUT, "cj_q16.jpg"), "rb").read()
    i = data.find(b"\xff\xdb")
    assert data[i + 4] >> 4 == 1, "cj_q16.jpg should have a 16-bit DQT"
    for name, chs in jp:
        for ch in chs:
            add_ref(name, ch, 8, "jpeg")


# ---------------------------------------------------------------------------------------------
# Hostile files
# ---------------------------------------------------------------------------------------------
class Bits:
    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, v, n):            # LSB first (deflate header fields, extra bits)
        for k in range(n):
            self.acc |= ((v >> k) & 1) << self.n
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc); self.acc = 0; self.n = 0

    def code(self, c, n):           # Huffman code, MSB first
        for k in range(n - 1, -1, -1):
            self.put((c >> k) & 1, 1)

    def bytes(self):
        return bytes(self.out) + (bytes([self.acc]) if self.n else b"")


def gen_bad():
    def w(name, data):
        with open(os.path.join(BAD, name), "wb") as f:
            f.write(data)
    good = open(os.path.join(OUT, "png_rgb8.png"), "rb").read()
    ok = open(os.path.join(OUT, "png_g8.png"), "rb").read()
    w("png_trunc_half.png", good[:len(good) // 2])
    w("png_trunc_iend.png", good[:-12])
    w("png_trunc_sig.png", good[:5])
    w("png_empty.png", b"")
    w("png_badmagic.png", b"\x89PNG\r\n\x1a\x0b" + good[8:])
    b = bytearray(ok); i = b.find(b"IDAT") + 10; b[i] ^= 0x40
    w("png_badcrc.png", bytes(b))

    def png_with(ihdr, idat_raw=None, z=None, extra=b"", ctype_chunks=b""):
        d = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + ctype_chunks
        d += chunk(b"IDAT", z if z is not None else zlib.compress(idat_raw)) + extra + chunk(b"IEND", b"")
        return d
    w("png_huge_dims.png", png_with(struct.pack(">IIBBBBB", 1 << 30, 1 << 30, 8, 2, 0, 0, 0), b"\0" * 10))
    w("png_too_many_pixels.png", png_with(struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0), b"\0" * 10))
    w("png_zero_width.png", png_with(struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0), b"\0" * 10))
    w("png_bad_ctype.png", png_with(struct.pack(">IIBBBBB", 4, 4, 8, 5, 0, 0, 0), b"\0" * 20))
    w("png_bad_depth.png", png_with(struct.pack(">IIBBBBB", 4, 4, 4, 2, 0, 0, 0), b"\0" * 20))
    w("png_bad_filter.png", png_with(struct.pack(">IIBBBBB", 4, 2, 8, 0, 0, 0, 0), b"\x07abcd\x00abcd"))
    w("png_short_data.png", png_with(struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0), b"\0" * 30))
    w("png_long_data.png", png_with(struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0), b"\0" * 300))
    w("png_bomb.png", png_with(struct.pack(">IIBBBBB", 100, 100, 8, 0, 0, 0, 0), b"\0" * (16 << 20)))
    w("png_no_plte.png", png_with(struct.pack(">IIBBBBB", 2, 2, 8, 3, 0, 0, 0), b"\0" * 6))
    w("png_bad_index.png", png_with(struct.pack(">IIBBBBB", 2, 2, 8, 3, 0, 0, 0), b"\0\0\5\0\0\0",
                                    ctype_chunks=chunk(b"PLTE", b"\1\2\3\4\5\6")))
    w("png_unknown_critical.png", png_with(struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0), b"\0" * 6,
                                           ctype_chunks=chunk(b"ABCD", b"xyz")))
    w("png_bad_zlib_header.png", png_with(struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0), z=b"\x79\x9c" + zlib.compress(b"\0" * 6)[2:]))
    # deflate streams with broken Huffman tables / distances
    bw = Bits(); bw.put(1, 1); bw.put(2, 2); bw.put(0, 5); bw.put(0, 5); bw.put(0, 4)
    for L in (1, 1, 1, 0): bw.put(L, 3)
    oversub = bw.bytes() + b"\0" * 8
    bw = Bits(); bw.put(1, 1); bw.put(2, 2); bw.put(0, 5); bw.put(0, 5); bw.put(0, 4)
    for L in (2, 2, 2, 0): bw.put(L, 3)
    incomplete_cl = bw.bytes() + b"\0" * 8
    bw = Bits(); bw.put(1, 1); bw.put(2, 2); bw.put(0, 5); bw.put(0, 5); bw.put(12, 4)
    order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2]
    for s in order: bw.put(1 if s in (0, 2) else 0, 3)
    lens = [0] * 258; lens[97] = 2; lens[256] = 2
    for L in lens: bw.code(0 if L == 0 else 1, 1)
    incomplete_ll = bw.bytes() + b"\0" * 8
    bw = Bits(); bw.put(1, 1); bw.put(1, 2); bw.code(1, 7); bw.code(0, 5)   # length 3, distance 1, nothing written yet
    far = bw.bytes() + b"\0" * 4
    bw = Bits(); bw.put(1, 1); bw.put(3, 2)
    btype3 = bw.bytes() + b"\0" * 4
    w("oversubscribed_clen.deflate", oversub)
    w("incomplete_clen.deflate", incomplete_cl)
    w("incomplete_litlen.deflate", incomplete_ll)
    w("distance_too_far.deflate", far)
    w("block_type3.deflate", btype3)
    w("stored_bad_nlen.deflate", b"\x01\x05\x00\x00\x00hello")
    w("stored_truncated.deflate", b"\x01\x05\x00\xfa\xffhel")
    w("empty.deflate", b"")
    z = zlib.compress(os.urandom(0) + bytes(range(256)) * 40)
    w("truncated.zlib", z[:len(z) // 2])
    w("bad_adler.zlib", z[:-1] + bytes([z[-1] ^ 1]))
    w("bad_header.zlib", b"\x78\x9d" + z[2:])
    w("bomb.zlib", zlib.compress(b"\0" * (64 << 20), 9))      # 64 MiB of zeros; tests cap at 16 MiB
    # JPEG
    j = open(os.path.join(OUT, "pil_420.jpg"), "rb").read()
    jr = open(os.path.join(OUT, "cj_rst420.jpg"), "rb").read()
    sos = j.find(b"\xff\xda")
    w("jpg_trunc_scan.jpg", j[:sos + (len(j) - sos) // 2])
    w("jpg_trunc_header.jpg", j[:sos - 40])
    w("jpg_no_eoi.jpg", j[:-2])
    w("jpg_badmagic.jpg", b"\xff\xd9" + j[2:])
    sof = j.find(b"\xff\xc0")
    b = bytearray(j); b[sof + 5:sof + 9] = b"\xff\xff\xff\xff"
    w("jpg_huge_dims.jpg", bytes(b))
    b = bytearray(j); b[sof + 5:sof + 9] = b"\x00\x00\x00\x10"
    w("jpg_zero_height.jpg", bytes(b))
    b = bytearray(j); b[sof + 4] = 12
    w("jpg_12bit.jpg", bytes(b))
    b = bytearray(j); b[sof + 1] = 0xC9
    w("jpg_arith.jpg", bytes(b))
    b = bytearray(j); b[sof + 11] = 0x33      # first component 3x3 with others 1x1 -> ok; make second 2x2
    b[sof + 14] = 0x22
    w("jpg_bad_sampling.jpg", bytes(b))
    b = bytearray(j); b[sof + 12] = 3
    w("jpg_undefined_qt.jpg", bytes(b))
    dht = j.find(b"\xff\xc4")
    b = bytearray(j); b[dht + 5] = 3          # three codes of length 1: over-subscribed
    w("jpg_bad_huffman.jpg", bytes(b))
    w("jpg_sos_before_sof.jpg", j[:2] + j[sos:])
    w("jpg_missing_rst.jpg", jr.replace(b"\xff\xd3", b""))
    b = bytearray(j); b[sos + 6] = 0x33      # first scan component uses Huffman tables 3/3: undefined
    w("jpg_undefined_huffman.jpg", bytes(b))
    names = sorted(n for n in os.listdir(BAD) if n != "LIST.txt")
    with open(os.path.join(BAD, "LIST.txt"), "w") as f:   # C11 has no directory listing
        f.write("\n".join(names) + "\n")


def gen_shared():
    lines = []
    files = sorted(glob.glob(os.path.join(SHARED, "**/*"), recursive=True))
    for f in files:
        if not f.lower().endswith((".png", ".jpg", ".jpeg")):
            continue
        rel = os.path.relpath(f, SHARED)
        im = Image.open(f)
        fmt = im.format
        mode = {"RGBA": "RGBA", "LA": "LA", "L": "L", "P": "RGBA" if "transparency" in im.info else "RGB"}.get(im.mode, "RGB")
        ch = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
        a = np.array(im.convert(mode)).astype(np.uint8)
        crc = zlib.crc32(a.tobytes()) & 0xFFFFFFFF
        ref = "-"
        if fmt == "JPEG":
            ref = "ref_" + os.path.splitext(os.path.basename(f))[0] + ".png"
            Image.fromarray(a, mode).save(os.path.join(OUT, ref), optimize=True)
        lines.append("%s %s %d %d %d %s %08x %d %s" % (rel, fmt, ch, im.size[0], im.size[1], im.mode, crc, int(a.astype(np.int64).sum()), ref))
    with open(os.path.join(OUT, "shared_manifest.txt"), "w") as f:
        f.write("# path-under-mixofshow-data format channels w h pil_mode crc32(pixels) sum(pixels) jpeg-ref-png\n")
        f.write("\n".join(lines) + "\n")


def main():
    for d in (OUT, BAD):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    gen_png()
    gen_jpeg()
    gen_bad()
    gen_shared()
    cj = subprocess.run(["cjpeg", "-version"], capture_output=True, text=True).stderr.strip()
    with open(os.path.join(OUT, "manifest.txt"), "w") as f:
        f.write("# generated by tools/ref/gen_image_golden.py (numpy seed 1234); Pillow %s, libjpeg %s, zlib %s, numpy %s, %s\n"
                % (PIL.__version__, features.version("jpg"), features.version("zlib"), np.__version__, cj.splitlines()[0] if cj else "cjpeg ?"))
        f.write("# file want_channels want_depth w h ref.raw kind(exact|jpeg: +-1)\n")
        f.write("\n".join(manifest) + "\n")
    print("%d reference entries" % len(manifest))


if __name__ == "__main__":
    main()
