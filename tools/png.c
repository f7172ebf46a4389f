/* tools/png.c — PNG decoder and encoder (PNG specification, 2nd edition / ISO 15948), plus
 * the image helpers shared with tools/jpeg.c (reading files, channel conversion, freeing).
 *
 * Decoding: every colour type (grey, RGB, palette, grey+alpha, RGBA), bit depths 1/2/4/8/16,
 * PLTE, tRNS, Adam7, all five filters; every chunk CRC is checked, unknown critical chunks are
 * refused, IHDR sizes are checked against MS_IMAGE_MAX_DIM / MS_IMAGE_MAX_PIXELS with
 * overflow-checked arithmetic before anything is allocated, and the zlib stream must hold
 * exactly the filtered image (inflate is capped at that size, so a bomb stops early).
 * Samples are first unpacked to 16 bits (v * 65535 / (2^depth - 1): 1-bit 0/65535, 8-bit
 * v * 257, which matches Pillow's 1/2/4-bit scaling to 0..255) and then converted to what the
 * caller asked for. Pillow differences: Pillow opens 16-bit grey as mode "I;16" and its
 * convert("L") clips at 255 instead of scaling; here 16 -> 8 always keeps the high byte.
 *
 * Encoding: 8-bit, 1..4 channels, per-row filter with the smallest sum of |residual| (as
 * signed bytes; PNG spec §12.8), one zlib stream from ms_deflate (level 6), one IDAT. */
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Shared image helpers                                                                      */
/* ---------------------------------------------------------------------------------------- */
void ms_image_free(MsImage *img) {
    if (!img) return;
    free(img->data);
    img->data = NULL;
}

/* Whole file into memory; read in pieces, so no ftell (long is 32-bit on Windows). */
static MsStatus read_whole_file(const char *path, size_t max_len, uint8_t **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    *buf = NULL;
    *len = 0;
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot open for reading", path);
    size_t cap = 0, n = 0;
    uint8_t *b = NULL;
    for (;;) {
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 65536;
            if (cap >= max_len) { free(b); fclose(f); return ms_errorf(MS_ERR_FORMAT, "%s: larger than %zu bytes", path, max_len); }
            if (nc > max_len) nc = max_len;
            uint8_t *nb = (uint8_t *)realloc(b, nc);
            if (!nb) { free(b); fclose(f); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, nc); }
            b = nb;
            cap = nc;
        }
        size_t got = fread(b + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) { free(b); return ms_errorf(MS_ERR_IO, "%s: read error", path); }
    *buf = b;
    *len = n;
    return MS_OK;
}

MsStatus ms_image_decode(const uint8_t *buf, size_t len, const char *name, int want_channels,
                         MsImage *img) {
    if (len >= 8 && memcmp(buf, "\x89PNG\r\n\x1a\n", 8) == 0)
        return ms_png_decode(buf, len, name, want_channels, 8, img);
    if (len >= 3 && buf[0] == 0xFF && buf[1] == 0xD8 && buf[2] == 0xFF)
        return ms_jpeg_decode(buf, len, name, want_channels, img);
    return ms_errorf(MS_ERR_FORMAT, "%s: not a PNG or JPEG file (first bytes %02x %02x %02x %02x)", name,
                     len > 0 ? buf[0] : 0, len > 1 ? buf[1] : 0, len > 2 ? buf[2] : 0, len > 3 ? buf[3] : 0);
}

MsStatus ms_image_read(const char *path, int want_channels, MsImage *img) {
    uint8_t *buf;
    size_t len;
    MsStatus st = read_whole_file(path, (size_t)1 << 30, &buf, &len);
    if (st != MS_OK) return st;
    st = ms_image_decode(buf, len, path, want_channels, img);
    free(buf);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* PNG decoding                                                                              */
/* ---------------------------------------------------------------------------------------- */
static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

typedef struct {
    uint32_t w, h;
    int depth, ctype, interlace;
    int nch;                    /* samples per pixel in the file: 1 (grey, palette), 2, 3, 4 */
    uint8_t plte[256 * 4];      /* RGBA */
    int nplte;
    int has_trns;
    uint16_t trns[3];           /* grey or RGB key (file depth) */
} PngInfo;

static const int adam7[7][4] = {   /* x0, y0, dx, dy */
    { 0, 0, 8, 8 }, { 4, 0, 8, 8 }, { 0, 4, 4, 8 }, { 2, 0, 4, 4 },
    { 0, 2, 2, 4 }, { 1, 0, 2, 2 }, { 0, 1, 1, 2 } };

static int paeth(int a, int b, int c) {
    int p = a + b - c, pa = p > a ? p - a : a - p, pb = p > b ? p - b : b - p, pc = p > c ? p - c : c - p;
    if (pa <= pb && pa <= pc) return a;
    return pb <= pc ? b : c;
}

/* Undoes the filters of one pass in place: rows of 1 + rowbytes bytes. */
static MsStatus unfilter(uint8_t *p, size_t rows, size_t rowbytes, size_t bpp, const char *name, int pass) {
    const uint8_t *prev = NULL;
    for (size_t y = 0; y < rows; y++) {
        uint8_t *row = p + y * (rowbytes + 1);
        int ft = row[0];
        uint8_t *x = row + 1;
        switch (ft) {
        case 0: break;
        case 1: for (size_t i = bpp; i < rowbytes; i++) x[i] = (uint8_t)(x[i] + x[i - bpp]); break;
        case 2: if (prev) for (size_t i = 0; i < rowbytes; i++) x[i] = (uint8_t)(x[i] + prev[i]); break;
        case 3:
            for (size_t i = 0; i < rowbytes; i++) {
                int a = i >= bpp ? x[i - bpp] : 0, b = prev ? prev[i] : 0;
                x[i] = (uint8_t)(x[i] + ((a + b) >> 1));
            }
            break;
        case 4:
            for (size_t i = 0; i < rowbytes; i++) {
                int a = i >= bpp ? x[i - bpp] : 0, b = prev ? prev[i] : 0, c = i >= bpp && prev ? prev[i - bpp] : 0;
                x[i] = (uint8_t)(x[i] + paeth(a, b, c));
            }
            break;
        default:
            return ms_errorf(MS_ERR_FORMAT, "%s: PNG filter type %d in row %zu of pass %d, expected 0..4", name, ft, y, pass);
        }
        prev = x;
    }
    return MS_OK;
}

/* Bytes per row (without the filter byte) for width pw; 0 on overflow. */
static size_t png_rowbytes(size_t pw, const PngInfo *pi) {
    size_t bits;
    if (!ms_mul_ok(pw, (size_t)pi->nch * (size_t)pi->depth, &bits)) return 0;
    return bits / 8 + (bits % 8 != 0);
}

/* Expands one decoded row (file depth) to 16-bit samples at native[x * nch + c] for the
 * pixels x0, x0 + dx, ... of output row y. */
static void png_unpack_row(const uint8_t *row, size_t pw, const PngInfo *pi, uint16_t *native,
                           size_t y, size_t x0, size_t dx) {
    size_t n = pw * (size_t)pi->nch;
    uint16_t *dst = native + y * (size_t)pi->w * (size_t)pi->nch;
    int d = pi->depth;
    for (size_t i = 0; i < n; i++) {
        uint32_t v;
        if (d == 16) v = (uint32_t)row[2 * i] << 8 | row[2 * i + 1];
        else if (d == 8) v = row[i];
        else {
            size_t bit = i * (size_t)d;
            v = (uint32_t)(row[bit / 8] >> (8 - d - (int)(bit % 8))) & ((1u << d) - 1);
        }
        size_t px = x0 + (i / (size_t)pi->nch) * dx, c = i % (size_t)pi->nch;
        dst[px * (size_t)pi->nch + c] = (uint16_t)v;    /* raw value at file depth */
    }
}

/* Pillow's RGB -> L (Convert.c, L24): ITU-R 601-2 luma in 16.16 fixed point. */
static uint32_t luma(uint32_t r, uint32_t g, uint32_t b) {
    return (uint32_t)(((uint64_t)r * 19595 + (uint64_t)g * 38470 + (uint64_t)b * 7471 + 0x8000) >> 16);
}

MsStatus ms_png_decode(const uint8_t *buf, size_t len, const char *name, int want_channels,
                       int want_depth, MsImage *img) {
    PngInfo pi;
    MsStatus st;
    memset(&pi, 0, sizeof pi);
    memset(img, 0, sizeof *img);
    if (!name) name = "(png)";
    if (want_channels < 0 || want_channels > 4 || (want_depth != 8 && want_depth != 16))
        return ms_errorf(MS_ERR_ARG, "%s: asked for %d channels at depth %d (channels 0..4, depth 8 or 16)", name, want_channels, want_depth);
    if (len < 8 || memcmp(buf, "\x89PNG\r\n\x1a\n", 8) != 0)
        return ms_errorf(MS_ERR_FORMAT, "%s: not a PNG file (bad signature)", name);
    /* pass 1: walk the chunks, check CRCs, read IHDR/PLTE/tRNS, sum the IDAT lengths */
    size_t pos = 8, idat_total = 0;
    int seen_ihdr = 0, seen_iend = 0, seen_idat = 0, idat_done = 0;
    while (!seen_iend) {
        if (len - pos < 12)
            return ms_errorf(MS_ERR_FORMAT, "%s: PNG truncated at byte %zu (expected a chunk header%s)", name, pos,
                             seen_idat ? " or IEND" : "");
        uint32_t clen = be32(buf + pos);
        const uint8_t *type = buf + pos + 4, *data = buf + pos + 8;
        if (clen > 0x7FFFFFFFu || clen > len - pos - 12)
            return ms_errorf(MS_ERR_FORMAT, "%s: PNG chunk at byte %zu has length %u, past the end of the file (%zu bytes)",
                             name, pos, (unsigned)clen, len);
        for (int k = 0; k < 4; k++)
            if (!((type[k] >= 'A' && type[k] <= 'Z') || (type[k] >= 'a' && type[k] <= 'z')))
                return ms_errorf(MS_ERR_FORMAT, "%s: PNG chunk at byte %zu has an invalid type", name, pos);
        uint32_t crc = ms_crc32(0, type, (size_t)clen + 4), want = be32(data + clen);
        if (crc != want)
            return ms_errorf(MS_ERR_FORMAT, "%s: PNG chunk %.4s at byte %zu: CRC 0x%08x, computed 0x%08x", name,
                             (const char *)type, pos, (unsigned)want, (unsigned)crc);
        if (!seen_ihdr && memcmp(type, "IHDR", 4) != 0)
            return ms_errorf(MS_ERR_FORMAT, "%s: PNG first chunk is %.4s, expected IHDR", name, (const char *)type);
        if (seen_idat && memcmp(type, "IDAT", 4) != 0) idat_done = 1;
        if (memcmp(type, "IHDR", 4) == 0) {
            if (seen_ihdr || clen != 13) return ms_errorf(MS_ERR_FORMAT, "%s: PNG IHDR repeated or of length %u (expected 13)", name, (unsigned)clen);
            seen_ihdr = 1;
            pi.w = be32(data);
            pi.h = be32(data + 4);
            pi.depth = data[8];
            pi.ctype = data[9];
            pi.interlace = data[12];
            if (data[10] != 0 || data[11] != 0 || pi.interlace > 1)
                return ms_errorf(MS_ERR_FORMAT, "%s: PNG compression %d / filter %d / interlace %d, expected 0 / 0 / 0 or 1",
                                 name, data[10], data[11], data[12]);
            int d = pi.depth, ok;
            switch (pi.ctype) {
            case 0: pi.nch = 1; ok = d == 1 || d == 2 || d == 4 || d == 8 || d == 16; break;
            case 3: pi.nch = 1; ok = d == 1 || d == 2 || d == 4 || d == 8; break;
            case 2: pi.nch = 3; ok = d == 8 || d == 16; break;
            case 4: pi.nch = 2; ok = d == 8 || d == 16; break;
            case 6: pi.nch = 4; ok = d == 8 || d == 16; break;
            default: ok = 0;
            }
            if (!ok) return ms_errorf(MS_ERR_FORMAT, "%s: PNG colour type %d with bit depth %d is not allowed", name, pi.ctype, d);
            if (pi.w == 0 || pi.h == 0 || pi.w > MS_IMAGE_MAX_DIM || pi.h > MS_IMAGE_MAX_DIM)
                return ms_errorf(MS_ERR_FORMAT, "%s: PNG size %ux%u (each side must be 1..%d)", name, (unsigned)pi.w,
                                 (unsigned)pi.h, MS_IMAGE_MAX_DIM);
            size_t npix;
            if (!ms_mul_ok(pi.w, pi.h, &npix) || npix > MS_IMAGE_MAX_PIXELS)
                return ms_errorf(MS_ERR_FORMAT, "%s: PNG size %ux%u exceeds %zu pixels", name, (unsigned)pi.w, (unsigned)pi.h,
                                 MS_IMAGE_MAX_PIXELS);
        } else if (memcmp(type, "PLTE", 4) == 0) {
            if (seen_idat || pi.nplte || clen % 3 || clen == 0 || clen > 768)
                return ms_errorf(MS_ERR_FORMAT, "%s: PNG PLTE of length %u (multiple of 3, <= 768, once, before IDAT)", name, (unsigned)clen);
            pi.nplte = (int)(clen / 3);
            for (int i = 0; i < pi.nplte; i++) {
                memcpy(pi.plte + 4 * i, data + 3 * i, 3);
                pi.plte[4 * i + 3] = 255;
            }
        } else if (memcmp(type, "tRNS", 4) == 0) {
            if (seen_idat) return ms_errorf(MS_ERR_FORMAT, "%s: PNG tRNS after IDAT", name);
            if (pi.ctype == 3) {
                if (!pi.nplte || clen > (uint32_t)pi.nplte)
                    return ms_errorf(MS_ERR_FORMAT, "%s: PNG tRNS with %u entries for a palette of %d", name, (unsigned)clen, pi.nplte);
                for (uint32_t i = 0; i < clen; i++) pi.plte[4 * i + 3] = data[i];
            } else if (pi.ctype == 0 || pi.ctype == 2) {
                if (clen != (pi.ctype == 0 ? 2u : 6u))
                    return ms_errorf(MS_ERR_FORMAT, "%s: PNG tRNS of length %u for colour type %d", name, (unsigned)clen, pi.ctype);
                for (uint32_t i = 0; i < clen / 2; i++) pi.trns[i] = (uint16_t)(data[2 * i] << 8 | data[2 * i + 1]);
            } else {
                return ms_errorf(MS_ERR_FORMAT, "%s: PNG tRNS not allowed with an alpha channel", name);
            }
            pi.has_trns = 1;
        } else if (memcmp(type, "IDAT", 4) == 0) {
            if (idat_done) return ms_errorf(MS_ERR_FORMAT, "%s: PNG IDAT chunks are not consecutive (byte %zu)", name, pos);
            if (pi.ctype == 3 && !pi.nplte) return ms_errorf(MS_ERR_FORMAT, "%s: PNG palette image without PLTE", name);
            seen_idat = 1;
            idat_total += clen;     /* <= len: no overflow */
        } else if (memcmp(type, "IEND", 4) == 0) {
            seen_iend = 1;
        } else if (!(type[0] & 32)) {
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s: unknown critical PNG chunk %.4s", name, (const char *)type);
        }
        pos += (size_t)clen + 12;
    }
    if (!seen_idat) return ms_errorf(MS_ERR_FORMAT, "%s: PNG has no IDAT chunk", name);
    /* the filtered image size, pass by pass */
    size_t raw_size = 0;
    for (int p = 0; p < (pi.interlace ? 7 : 1); p++) {
        size_t pw = pi.w, ph = pi.h;
        if (pi.interlace) {
            pw = pi.w > (uint32_t)adam7[p][0] ? (pi.w - adam7[p][0] + adam7[p][2] - 1) / adam7[p][2] : 0;
            ph = pi.h > (uint32_t)adam7[p][1] ? (pi.h - adam7[p][1] + adam7[p][3] - 1) / adam7[p][3] : 0;
        }
        if (!pw || !ph) continue;
        size_t rb = png_rowbytes(pw, &pi), sz;
        if (!rb || !ms_mul_ok(rb + 1, ph, &sz) || !ms_add_ok(raw_size, sz, &raw_size))
            return ms_errorf(MS_ERR_FORMAT, "%s: PNG size overflows", name);
    }
    /* pass 2: gather the IDAT payloads and inflate */
    uint8_t *z = (uint8_t *)malloc(idat_total ? idat_total : 1);
    if (!z) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory (%zu bytes of IDAT)", name, idat_total);
    size_t zn = 0;
    for (pos = 8; pos < len;) {
        uint32_t clen = be32(buf + pos);
        if (memcmp(buf + pos + 4, "IDAT", 4) == 0) { memcpy(z + zn, buf + pos + 8, clen); zn += clen; }
        if (memcmp(buf + pos + 4, "IEND", 4) == 0) break;
        pos += (size_t)clen + 12;
    }
    uint8_t *raw;
    size_t raw_len;
    st = ms_inflate(z, zn, 1, raw_size, &raw, &raw_len);
    free(z);
    if (st != MS_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ms_last_error());
        return ms_errorf(st, "%s: PNG image data: %s (expected %zu bytes)", name, msg, raw_size);
    }
    if (raw_len != raw_size) {
        free(raw);
        return ms_errorf(MS_ERR_FORMAT, "%s: PNG image data holds %zu bytes, expected %zu", name, raw_len, raw_size);
    }
    /* unfilter and unpack every pass into native 16-bit raw samples */
    size_t npix = (size_t)pi.w * pi.h;
    uint16_t *native = (uint16_t *)malloc(npix * (size_t)pi.nch * sizeof(uint16_t));
    if (!native) { free(raw); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory (%zu pixels)", name, npix); }
    size_t bpp = (size_t)(pi.nch * pi.depth + 7) / 8, off = 0;
    for (int p = 0; p < (pi.interlace ? 7 : 1); p++) {
        size_t x0 = 0, y0 = 0, dx = 1, dy = 1, pw = pi.w, ph = pi.h;
        if (pi.interlace) {
            x0 = (size_t)adam7[p][0]; y0 = (size_t)adam7[p][1]; dx = (size_t)adam7[p][2]; dy = (size_t)adam7[p][3];
            pw = pi.w > x0 ? (pi.w - x0 + dx - 1) / dx : 0;
            ph = pi.h > y0 ? (pi.h - y0 + dy - 1) / dy : 0;
        }
        if (!pw || !ph) continue;
        size_t rb = png_rowbytes(pw, &pi);
        if ((st = unfilter(raw + off, ph, rb, bpp, name, p)) != MS_OK) { free(raw); free(native); return st; }
        for (size_t y = 0; y < ph; y++)
            png_unpack_row(raw + off + y * (rb + 1) + 1, pw, &pi, native, y0 + y * dy, x0, dx);
        off += (rb + 1) * ph;
    }
    free(raw);
    /* convert */
    int fch = pi.ctype == 3 ? 3 + (pi.has_trns ? 1 : 0) : pi.nch + (pi.has_trns ? 1 : 0);
    int och = want_channels ? want_channels : fch;
    size_t ob = want_depth / 8, onum = npix * (size_t)och;
    void *out = malloc(onum * ob);
    if (!out) { free(native); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory (%zu pixels)", name, npix); }
    uint32_t maxv = (1u << pi.depth) - 1, scale = 65535u / maxv;   /* exact for 1, 2, 4, 8, 16 */
    int colour = pi.ctype == 2 || pi.ctype == 3 || pi.ctype == 6;
    for (size_t i = 0; i < npix; i++) {
        const uint16_t *s = native + i * (size_t)pi.nch;
        uint32_t c[4], a = 65535;                       /* 16-bit R, G, B (or grey in c[0]), A */
        if (pi.ctype == 3) {
            if (s[0] >= pi.nplte) {
                int idx = s[0];
                free(native); free(out);
                return ms_errorf(MS_ERR_FORMAT, "%s: PNG palette index %d at pixel %zu, palette has %d entries", name, idx, i, pi.nplte);
            }
            const uint8_t *e = pi.plte + 4 * s[0];
            c[0] = e[0] * 257u; c[1] = e[1] * 257u; c[2] = e[2] * 257u; a = e[3] * 257u;
        } else if (pi.ctype == 2 || pi.ctype == 6) {
            c[0] = s[0] * scale; c[1] = s[1] * scale; c[2] = s[2] * scale;
            if (pi.ctype == 6) a = s[3] * scale;
            else if (pi.has_trns && s[0] == pi.trns[0] && s[1] == pi.trns[1] && s[2] == pi.trns[2]) a = 0;
        } else {
            c[0] = c[1] = c[2] = s[0] * scale;
            if (pi.ctype == 4) a = s[1] * scale;
            else if (pi.has_trns && s[0] == pi.trns[0]) a = 0;
        }
        uint32_t v[4];
        int sh = want_depth == 8 ? 8 : 0;
        if (och <= 2) {
            /* Pillow computes L from the 8-bit values when it converts an 8-bit image */
            v[0] = !colour ? c[0] >> sh : sh ? luma(c[0] >> 8, c[1] >> 8, c[2] >> 8) : luma(c[0], c[1], c[2]);
            v[1] = a >> sh;
        } else {
            v[0] = c[0] >> sh; v[1] = c[1] >> sh; v[2] = c[2] >> sh; v[3] = a >> sh;
        }
        for (int k = 0; k < och; k++) {
            if (ob == 1) ((uint8_t *)out)[i * (size_t)och + (size_t)k] = (uint8_t)v[k];
            else ((uint16_t *)out)[i * (size_t)och + (size_t)k] = (uint16_t)v[k];
        }
    }
    free(native);
    img->w = (int)pi.w;
    img->h = (int)pi.h;
    img->channels = och;
    img->file_channels = fch;
    img->depth = want_depth;
    img->data = out;
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* PNG encoding                                                                              */
/* ---------------------------------------------------------------------------------------- */
static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* Appends one chunk at *o (enough room reserved by the caller). */
static size_t put_chunk(uint8_t *o, const char *type, const uint8_t *data, uint32_t n) {
    put_be32(o, n);
    memcpy(o + 4, type, 4);
    if (n) memcpy(o + 8, data, n);
    put_be32(o + 8 + n, ms_crc32(0, o + 4, (size_t)n + 4));
    return (size_t)n + 12;
}

MsStatus ms_png_encode(const uint8_t *pixels, int w, int h, int channels, uint8_t **out,
                       size_t *out_len) {
    static const int ctypes[5] = { 0, 0, 4, 2, 6 };
    *out = NULL;
    *out_len = 0;
    if (channels < 1 || channels > 4 || w < 1 || h < 1 || w > MS_IMAGE_MAX_DIM || h > MS_IMAGE_MAX_DIM)
        return ms_errorf(MS_ERR_ARG, "png encode: %dx%d with %d channels (1..4 channels, sides 1..%d)", w, h, channels, MS_IMAGE_MAX_DIM);
    size_t rb = (size_t)w * (size_t)channels, bpp = (size_t)channels, fsize;
    if (!ms_mul_ok(rb + 1, (size_t)h, &fsize)) return ms_errorf(MS_ERR_ARG, "png encode: %dx%d overflows", w, h);
    uint8_t *f = (uint8_t *)malloc(fsize), *cand = (uint8_t *)malloc(5 * rb);
    if (!f || !cand) { free(f); free(cand); return ms_errorf(MS_ERR_NOMEM, "png encode: out of memory"); }
    for (size_t y = 0; y < (size_t)h; y++) {
        const uint8_t *x = pixels + y * rb, *up = y ? x - rb : NULL;
        uint64_t best_cost = UINT64_MAX;
        int best = 0;
        for (int ft = 0; ft < 5; ft++) {
            uint8_t *r = cand + (size_t)ft * rb;
            uint64_t cost = 0;
            for (size_t i = 0; i < rb; i++) {
                int a = i >= bpp ? x[i - bpp] : 0, b = up ? up[i] : 0, c = i >= bpp && up ? up[i - bpp] : 0, pred;
                switch (ft) {
                case 0: pred = 0; break;
                case 1: pred = a; break;
                case 2: pred = b; break;
                case 3: pred = (a + b) >> 1; break;
                default: pred = paeth(a, b, c); break;
                }
                r[i] = (uint8_t)(x[i] - pred);
                cost += r[i] < 128 ? r[i] : 256 - r[i];
            }
            if (cost < best_cost) { best_cost = cost; best = ft; }
        }
        f[y * (rb + 1)] = (uint8_t)best;
        memcpy(f + y * (rb + 1) + 1, cand + (size_t)best * rb, rb);
    }
    free(cand);
    uint8_t *z;
    size_t zn;
    MsStatus st = ms_deflate(f, fsize, 1, 6, &z, &zn);
    free(f);
    if (st != MS_OK) return st;
    size_t nidat = zn / 0x40000000u + 1, total = 8 + 25 + 12, t2;   /* IDATs of <= 1 GiB */
    if (!ms_mul_ok(nidat, 12, &t2) || !ms_add_ok(total, t2, &total) || !ms_add_ok(total, zn, &total)) {
        free(z);
        return ms_errorf(MS_ERR_ARG, "png encode: too large");
    }
    uint8_t *o = (uint8_t *)malloc(total);
    if (!o) { free(z); return ms_errorf(MS_ERR_NOMEM, "png encode: out of memory"); }
    uint8_t ihdr[13];
    put_be32(ihdr, (uint32_t)w);
    put_be32(ihdr + 4, (uint32_t)h);
    ihdr[8] = 8; ihdr[9] = (uint8_t)ctypes[channels]; ihdr[10] = ihdr[11] = ihdr[12] = 0;
    memcpy(o, "\x89PNG\r\n\x1a\n", 8);
    size_t n = 8;
    n += put_chunk(o + n, "IHDR", ihdr, 13);
    for (size_t k = 0; k < zn || k == 0; k += 0x40000000u) {
        size_t m = zn - k < 0x40000000u ? zn - k : 0x40000000u;
        n += put_chunk(o + n, "IDAT", z + k, (uint32_t)m);
    }
    n += put_chunk(o + n, "IEND", NULL, 0);
    free(z);
    *out = o;
    *out_len = n;
    return MS_OK;
}

MsStatus ms_png_write(const char *path, const uint8_t *pixels, int w, int h, int channels) {
    uint8_t *png;
    size_t n;
    MsStatus st = ms_png_encode(pixels, w, h, channels, &png, &n);
    if (st != MS_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ms_last_error());
        return ms_errorf(st, "%s: %s", path, msg);
    }
    size_t pl = strlen(path);
    char *tmp = (char *)malloc(pl + 5);
    if (!tmp) { free(png); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
    memcpy(tmp, path, pl);
    memcpy(tmp + pl, ".tmp", 5);
    FILE *f = fopen(tmp, "wb");
    if (!f) { free(png); free(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot open %s.tmp for writing", path, path); }
    size_t wr = fwrite(png, 1, n, f);
    int bad = wr != n;
    bad |= fclose(f) != 0;
    free(png);
    if (bad) { remove(tmp); free(tmp); return ms_errorf(MS_ERR_IO, "%s: write failed", path); }
    if (rename(tmp, path) != 0) {
        /* Windows cannot rename over an existing file */
        remove(path);
        if (rename(tmp, path) != 0) { remove(tmp); free(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot rename %s.tmp to it", path, path); }
    }
    free(tmp);
    return MS_OK;
}
