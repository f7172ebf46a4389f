/* tools/jpeg.c — JPEG decoder (ITU-T T.81): baseline and extended sequential Huffman (SOF0,
 * SOF1) and progressive Huffman (SOF2), 8-bit precision, 1 (grey) or 3 components with any
 * sampling factors 1..4 that divide the largest, restart intervals, 8- and 16-bit DQT,
 * JFIF / Adobe (APP14) / component-id colour rules.
 *
 * The pixels are meant to equal what Pillow 9 gets from libjpeg-turbo 2.1 with its defaults,
 * so every stage after entropy decoding follows libjpeg's integer arithmetic:
 *   - islow IDCT (jidctint.c: Loeffler-Ligtenberg-Moschytz, 13-bit constants, PASS1_BITS 2,
 *     the same zero-AC shortcuts) and libjpeg's post-IDCT range limit (sample + 128, clamped
 *     to 0..255 for |x| < 512 and wrapping mod 1024 beyond, as its table does);
 *   - "fancy" upsampling (jdsample.c): h2v1 and h2v2 triangle filters with libjpeg's rounding
 *     biases (h2v2: 8 and 7 in alternate columns), h1v2 (libjpeg-turbo's 4:4:0 filter),
 *     used when the component is wider than 2 samples; other integer ratios replicate;
 *     edges repeat the last real sample (row or column), as libjpeg's context rows do;
 *   - YCbCr -> RGB with jdcolor.c's 16-bit fixed-point tables.
 * libjpeg-turbo's SIMD versions of these are bit-exact with its C code, so on valid files
 * the output should match exactly (tests allow +-1 and report the count of differences).
 * What differs: corrupt data. libjpeg warns and fills with zeros (bad Huffman code, early
 * marker, missing RST) while this decoder stops with an error; IDCT intermediates are 64-bit
 * here (libjpeg stores the column pass in int), which only matters for absurd coefficients.
 * Also: a progressive file whose scans never send some AC bands is "block smoothed" by
 * libjpeg (jdcoefct.c) and not here; complete files, the normal case, are not smoothed.
 * Not supported (clear error): arithmetic coding, lossless, hierarchical, 12-bit, 2 or 4
 * components (CMYK/YCCK), DNL.
 *
 * All coefficients are decoded first (int16 per coefficient, as libjpeg's JCOEF), then each
 * component is dequantized with the table latched at its first scan, transformed, upsampled
 * and colour-converted. Before allocating, the frame's block count is checked against the
 * bytes left in the file (every coded block costs at least one bit), so a tiny hostile file
 * cannot ask for a large buffer. */
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t zigzag[64] = {   /* zig-zag index -> natural (row-major) index */
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27,
    20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58,
    59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63 };

typedef struct {
    int defined;
    uint16_t fast[1 << 9];   /* (len << 8) | value for codes of <= 9 bits; 0: slow path */
    int32_t maxcode[18];     /* largest code of each length, -1 if none (T.81 F.2.2.3) */
    int32_t valptr[17], mincode[17];
    uint8_t vals[256];
} JHuff;

typedef struct {
    int id, h, v, tq;
    int bw, bh;              /* blocks per row / column, padded to whole MCUs */
    int cw, ch;              /* component size in samples: ceil(W * h / hmax) x ceil(H * v / vmax) */
    int16_t *coef;           /* (bh, bw, 64), natural order */
    uint16_t q[64];          /* quantization table latched at the first scan (natural order) */
    int seen;                /* in some scan already */
    int dc_pred;
    int td, ta;              /* Huffman tables of the current scan */
} JComp;

typedef struct {
    const char *name;
    const uint8_t *buf;
    size_t len, pos;
    /* entropy bit reader: MSB-first, byte stuffing removed, zeros fed at markers / end */
    uint64_t bits;
    int nbits;
    int fake;                /* zero bits fed that were not in the file (all at the bottom) */
    int at_marker;
    uint16_t qt[4][64];
    int qt_defined[4];
    JHuff hdc[4], hac[4];
    int progressive, ncomp, hmax, vmax, mcux, mcuy, restart;
    int w, h;
    int saw_jfif, saw_adobe, adobe_transform;
    JComp c[4];
    int eobrun;
} Jpeg;

static MsStatus jerr(Jpeg *j, const char *what) {
    return ms_errorf(MS_ERR_FORMAT, "%s: JPEG %s (near byte %zu)", j->name, what, j->pos);
}

static int16_t wrap16(int32_t v) {      /* two's-complement truncation, like libjpeg's (JCOEF) */
    v &= 0xFFFF;
    if (v >= 32768) v -= 65536;
    return (int16_t)v;
}

/* ---------------------------------------------------------------------------------------- */
/* Entropy-coded data                                                                        */
/* ---------------------------------------------------------------------------------------- */
static void jfill(Jpeg *j) {
    while (j->nbits <= 56) {
        uint32_t b = 0;
        if (!j->at_marker && j->pos < j->len) {
            b = j->buf[j->pos];
            if (b == 0xFF) {
                uint32_t nx = j->pos + 1 < j->len ? j->buf[j->pos + 1] : 0x100;
                if (nx == 0) j->pos += 2;                 /* stuffed 0xFF 0x00 */
                else { j->at_marker = 1; b = 0; j->fake += 8; }
            } else {
                j->pos++;
            }
        } else {
            j->fake += 8;
        }
        j->bits = (j->bits << 8) | b;
        j->nbits += 8;
    }
}

static uint32_t jget(Jpeg *j, int n) {   /* n <= 16 */
    if (n == 0) return 0;
    if (j->nbits < n) jfill(j);
    j->nbits -= n;
    return (uint32_t)(j->bits >> j->nbits) & ((1u << n) - 1);
}

static int jover(const Jpeg *j) { return j->nbits < j->fake; }   /* used a bit that is not there */

static int extend(uint32_t v, int s) {   /* T.81 F.2.2.1 EXTEND */
    if (s == 0) return 0;
    return v < (1u << (s - 1)) ? (int)v - (1 << s) + 1 : (int)v;
}

/* -1 when the bits are no code of the table */
static int jdecode(Jpeg *j, const JHuff *t) {
    if (j->nbits < 16) jfill(j);
    uint32_t peek = (uint32_t)(j->bits >> (j->nbits - 9)) & 511;
    int e = t->fast[peek];
    if (e) { j->nbits -= e >> 8; return e & 255; }
    for (int l = 10; l <= 16; l++) {
        int32_t code = (int32_t)((j->bits >> (j->nbits - l)) & ((1u << l) - 1));
        if (code <= t->maxcode[l]) {
            j->nbits -= l;
            return t->vals[t->valptr[l] + code - t->mincode[l]];
        }
    }
    return -1;
}

static MsStatus build_huff(Jpeg *j, JHuff *t, const uint8_t *counts, const uint8_t *vals, int nvals, int is_dc) {
    int code = 0, k = 0;
    memset(t, 0, sizeof *t);
    memcpy(t->vals, vals, (size_t)nvals);
    for (int l = 1; l <= 16; l++) {
        t->valptr[l] = k;
        t->mincode[l] = code;
        code += counts[l - 1];
        k += counts[l - 1];
        if (code > (1 << l)) return jerr(j, "DHT: over-subscribed Huffman table");
        t->maxcode[l] = counts[l - 1] ? code - 1 : -1;
        code <<= 1;
    }
    t->maxcode[17] = 0x7FFFFFFF;
    if (is_dc)
        for (int i = 0; i < nvals; i++) if (vals[i] > 15) return jerr(j, "DHT: DC symbol > 15");
    /* fast table: codes of length <= 9, left-aligned in 9 bits */
    k = 0;
    for (int l = 1; l <= 9; l++)
        for (int i = 0; i < counts[l - 1]; i++, k++) {
            int c = t->mincode[l] + i, shift = 9 - l;
            for (int f = c << shift; f < (c + 1) << shift; f++) t->fast[f] = (uint16_t)(l << 8 | vals[k]);
        }
    t->defined = 1;
    return MS_OK;
}

/* Decodes one block of a sequential scan into blk (natural order). */
static MsStatus decode_block_seq(Jpeg *j, JComp *c, int16_t *blk) {
    memset(blk, 0, 64 * sizeof *blk);
    int s = jdecode(j, &j->hdc[c->td]);
    if (s < 0) return jerr(j, "bad Huffman code (DC)");
    int diff = extend(jget(j, s), s);
    c->dc_pred += diff;
    if (c->dc_pred < -32768 || c->dc_pred > 32767) return jerr(j, "DC coefficient out of range");
    blk[0] = (int16_t)c->dc_pred;
    const JHuff *ac = &j->hac[c->ta];
    for (int k = 1; k < 64; k++) {
        int rs = jdecode(j, ac);
        if (rs < 0) return jerr(j, "bad Huffman code (AC)");
        int r = rs >> 4;
        s = rs & 15;
        if (s) {
            k += r;
            if (k > 63) return jerr(j, "AC coefficient index past 63");
            blk[zigzag[k]] = (int16_t)extend(jget(j, s), s);
        } else {
            if (r != 15) break;
            k += 15;
        }
    }
    return MS_OK;
}

/* Progressive scans (T.81 G.1.2). */
static MsStatus decode_block_prog(Jpeg *j, JComp *c, int16_t *blk, int ss, int se, int ah, int al) {
    if (ss == 0) {
        if (ah == 0) {
            int s = jdecode(j, &j->hdc[c->td]);
            if (s < 0) return jerr(j, "bad Huffman code (DC)");
            c->dc_pred += extend(jget(j, s), s);
            if (c->dc_pred < -32768 || c->dc_pred > 32767) return jerr(j, "DC coefficient out of range");
            blk[0] = wrap16(c->dc_pred * (1 << al));
        } else if (jget(j, 1)) {
            blk[0] = wrap16(blk[0] | (1 << al));
        }
        return MS_OK;
    }
    const JHuff *ac = &j->hac[c->ta];
    if (ah == 0) {
        if (j->eobrun > 0) { j->eobrun--; return MS_OK; }
        for (int k = ss; k <= se; k++) {
            int rs = jdecode(j, ac);
            if (rs < 0) return jerr(j, "bad Huffman code (AC)");
            int r = rs >> 4, s = rs & 15;
            if (s) {
                k += r;
                if (k > se) return jerr(j, "AC coefficient index past the scan's end");
                blk[zigzag[k]] = wrap16(extend(jget(j, s), s) * (1 << al));
            } else if (r < 15) {
                j->eobrun = (1 << r) - 1;
                if (r) j->eobrun += (int)jget(j, r);
                break;
            } else {
                k += 15;
            }
        }
        return MS_OK;
    }
    /* AC refinement: a new coefficient of magnitude 1 << al is placed after r zero-history
     * coefficients; every nonzero coefficient passed on the way gets one correction bit. */
    int p1 = 1 << al, m1 = -p1, k = ss;
    if (j->eobrun == 0) {
        for (; k <= se; k++) {
            int rs = jdecode(j, ac);
            if (rs < 0) return jerr(j, "bad Huffman code (AC refinement)");
            int r = rs >> 4, s = rs & 15, val = 0;
            if (s) {
                if (s != 1) return jerr(j, "AC refinement value of size != 1");
                val = jget(j, 1) ? p1 : m1;
            } else if (r != 15) {
                j->eobrun = 1 << r;
                if (r) j->eobrun += (int)jget(j, r);
                break;
            }
            for (; k <= se; k++) {
                int16_t *co = blk + zigzag[k];
                if (*co != 0) {
                    if (jget(j, 1) && (*co & p1) == 0) *co = wrap16(*co + (*co >= 0 ? p1 : m1));
                } else {
                    if (r-- == 0) break;
                }
            }
            if (val) {
                if (k > se) return jerr(j, "AC refinement index past the scan's end");
                blk[zigzag[k]] = (int16_t)val;
            }
        }
    }
    if (j->eobrun > 0) {
        for (; k <= se; k++) {
            int16_t *co = blk + zigzag[k];
            if (*co != 0 && jget(j, 1) && (*co & p1) == 0) *co = wrap16(*co + (*co >= 0 ? p1 : m1));
        }
        j->eobrun--;
    }
    return MS_OK;
}

/* Skips to the expected RSTn marker and resets the decoder state. */
static MsStatus restart(Jpeg *j, int *next_rst, JComp **sc, int ns) {
    j->bits = 0;
    j->nbits = 0;
    j->fake = 0;
    j->at_marker = 0;
    while (j->pos + 1 < j->len && j->buf[j->pos] == 0xFF && j->buf[j->pos + 1] == 0xFF) j->pos++;
    if (j->pos + 1 >= j->len || j->buf[j->pos] != 0xFF || j->buf[j->pos + 1] != 0xD0 + *next_rst) {
        char msg[64];
        snprintf(msg, sizeof msg, "expected restart marker RST%d", *next_rst);
        return jerr(j, msg);
    }
    j->pos += 2;
    *next_rst = (*next_rst + 1) & 7;
    for (int i = 0; i < ns; i++) sc[i]->dc_pred = 0;
    j->eobrun = 0;
    return MS_OK;
}

static MsStatus decode_scan(Jpeg *j, JComp **sc, int ns, int ss, int se, int ah, int al) {
    MsStatus st;
    int next_rst = 0;

    size_t mcus_x, mcus_y;
    if (ns == 1) {     /* non-interleaved: only the blocks that hold image samples */
        mcus_x = (size_t)(sc[0]->cw + 7) / 8;
        mcus_y = (size_t)(sc[0]->ch + 7) / 8;
    } else {
        mcus_x = (size_t)j->mcux;
        mcus_y = (size_t)j->mcuy;
    }
    size_t done = 0;
    for (int i = 0; i < ns; i++) sc[i]->dc_pred = 0;
    j->eobrun = 0;
    j->bits = 0;
    j->nbits = 0;
    j->fake = 0;
    j->at_marker = 0;
    for (size_t my = 0; my < mcus_y; my++)
        for (size_t mx = 0; mx < mcus_x; mx++) {
            if (j->restart && done > 0 && done % (size_t)j->restart == 0)
                if ((st = restart(j, &next_rst, sc, ns)) != MS_OK) return st;
            for (int i = 0; i < ns; i++) {
                JComp *c = sc[i];
                int bh = ns == 1 ? 1 : c->v, bw = ns == 1 ? 1 : c->h;
                for (int by = 0; by < bh; by++)
                    for (int bx = 0; bx < bw; bx++) {
                        size_t row = ns == 1 ? my : my * (size_t)c->v + (size_t)by;
                        size_t col = ns == 1 ? mx : mx * (size_t)c->h + (size_t)bx;
                        int16_t *blk = c->coef + (row * (size_t)c->bw + col) * 64;
                        st = j->progressive ? decode_block_prog(j, c, blk, ss, se, ah, al) : decode_block_seq(j, c, blk);
                        if (st != MS_OK) return st;
                    }
            }
            if (jover(j)) return jerr(j, "entropy-coded data ends early (truncated file or marker inside the scan)");
            done++;
        }
    /* leave pos at the next marker: skip padding bits and any garbage bytes */
    j->bits = 0;
    j->nbits = 0;
    j->fake = 0;
    j->at_marker = 0;
    while (j->pos + 1 < j->len && !(j->buf[j->pos] == 0xFF && j->buf[j->pos + 1] != 0 && j->buf[j->pos + 1] != 0xFF))
        j->pos++;
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* IDCT, upsampling, colour (libjpeg's integer arithmetic)                                   */
/* ---------------------------------------------------------------------------------------- */
#define CONST_BITS 13
#define PASS1_BITS 2
#define FIX_0_298631336 2446
#define FIX_0_390180644 3196
#define FIX_0_541196100 4433
#define FIX_0_765366865 6270
#define FIX_0_899976223 7373
#define FIX_1_175875602 9633
#define FIX_1_501321110 12299
#define FIX_1_847759065 15137
#define FIX_1_961570560 16069
#define FIX_2_053119869 16819
#define FIX_2_562915447 20995
#define FIX_3_072711026 25172

static int64_t sra(int64_t x, int n) { return x >= 0 ? x >> n : -((-x - 1) >> n) - 1; }  /* floor(x / 2^n) */
static int64_t descale(int64_t x, int n) { return sra(x + ((int64_t)1 << (n - 1)), n); }

/* libjpeg's post-IDCT range limit: x + 128 clamped, indexed mod 1024 (jdmaster.c table). */
static uint8_t idct_limit(int64_t x) {
    int i = (int)(x & 1023);
    if (i < 128) return (uint8_t)(i + 128);
    if (i < 512) return 255;
    if (i < 896) return 0;
    return (uint8_t)(i - 896);
}

/* One 8x8 block: jidctint.c jpeg_idct_islow. in: quantized coefficients (natural order). */
static void idct_islow(const int16_t *in, const uint16_t *q, uint8_t *out, size_t stride) {
    int64_t ws[64];
    for (int col = 0; col < 8; col++) {
        const int16_t *p = in + col;
        const uint16_t *qq = q + col;
        if (!p[8] && !p[16] && !p[24] && !p[32] && !p[40] && !p[48] && !p[56]) {
            int64_t dc = (int64_t)p[0] * qq[0] * (1 << PASS1_BITS);
            for (int r = 0; r < 8; r++) ws[r * 8 + col] = dc;
            continue;
        }
        int64_t z1, z2, z3, z4, z5, tmp0, tmp1, tmp2, tmp3, tmp10, tmp11, tmp12, tmp13;
        z2 = (int64_t)p[16] * qq[16];
        z3 = (int64_t)p[48] * qq[48];
        z1 = (z2 + z3) * FIX_0_541196100;
        tmp2 = z1 + z3 * (-FIX_1_847759065);
        tmp3 = z1 + z2 * FIX_0_765366865;
        z2 = (int64_t)p[0] * qq[0];
        z3 = (int64_t)p[32] * qq[32];
        tmp0 = (z2 + z3) * (1 << CONST_BITS);
        tmp1 = (z2 - z3) * (1 << CONST_BITS);
        tmp10 = tmp0 + tmp3; tmp13 = tmp0 - tmp3; tmp11 = tmp1 + tmp2; tmp12 = tmp1 - tmp2;
        tmp0 = (int64_t)p[56] * qq[56];
        tmp1 = (int64_t)p[40] * qq[40];
        tmp2 = (int64_t)p[24] * qq[24];
        tmp3 = (int64_t)p[8] * qq[8];
        z1 = tmp0 + tmp3; z2 = tmp1 + tmp2; z3 = tmp0 + tmp2; z4 = tmp1 + tmp3;
        z5 = (z3 + z4) * FIX_1_175875602;
        tmp0 *= FIX_0_298631336; tmp1 *= FIX_2_053119869; tmp2 *= FIX_3_072711026; tmp3 *= FIX_1_501321110;
        z1 *= -FIX_0_899976223; z2 *= -FIX_2_562915447; z3 *= -FIX_1_961570560; z4 *= -FIX_0_390180644;
        z3 += z5; z4 += z5;
        tmp0 += z1 + z3; tmp1 += z2 + z4; tmp2 += z2 + z3; tmp3 += z1 + z4;
        ws[0 * 8 + col] = descale(tmp10 + tmp3, CONST_BITS - PASS1_BITS);
        ws[7 * 8 + col] = descale(tmp10 - tmp3, CONST_BITS - PASS1_BITS);
        ws[1 * 8 + col] = descale(tmp11 + tmp2, CONST_BITS - PASS1_BITS);
        ws[6 * 8 + col] = descale(tmp11 - tmp2, CONST_BITS - PASS1_BITS);
        ws[2 * 8 + col] = descale(tmp12 + tmp1, CONST_BITS - PASS1_BITS);
        ws[5 * 8 + col] = descale(tmp12 - tmp1, CONST_BITS - PASS1_BITS);
        ws[3 * 8 + col] = descale(tmp13 + tmp0, CONST_BITS - PASS1_BITS);
        ws[4 * 8 + col] = descale(tmp13 - tmp0, CONST_BITS - PASS1_BITS);
    }
    for (int row = 0; row < 8; row++) {
        const int64_t *w = ws + row * 8;
        uint8_t *o = out + (size_t)row * stride;
        if (!w[1] && !w[2] && !w[3] && !w[4] && !w[5] && !w[6] && !w[7]) {
            uint8_t v = idct_limit(descale(w[0], PASS1_BITS + 3));
            for (int i = 0; i < 8; i++) o[i] = v;
            continue;
        }
        int64_t z1, z2, z3, z4, z5, tmp0, tmp1, tmp2, tmp3, tmp10, tmp11, tmp12, tmp13;
        z2 = w[2]; z3 = w[6];
        z1 = (z2 + z3) * FIX_0_541196100;
        tmp2 = z1 + z3 * (-FIX_1_847759065);
        tmp3 = z1 + z2 * FIX_0_765366865;
        tmp0 = (w[0] + w[4]) * (1 << CONST_BITS);
        tmp1 = (w[0] - w[4]) * (1 << CONST_BITS);
        tmp10 = tmp0 + tmp3; tmp13 = tmp0 - tmp3; tmp11 = tmp1 + tmp2; tmp12 = tmp1 - tmp2;
        tmp0 = w[7]; tmp1 = w[5]; tmp2 = w[3]; tmp3 = w[1];
        z1 = tmp0 + tmp3; z2 = tmp1 + tmp2; z3 = tmp0 + tmp2; z4 = tmp1 + tmp3;
        z5 = (z3 + z4) * FIX_1_175875602;
        tmp0 *= FIX_0_298631336; tmp1 *= FIX_2_053119869; tmp2 *= FIX_3_072711026; tmp3 *= FIX_1_501321110;
        z1 *= -FIX_0_899976223; z2 *= -FIX_2_562915447; z3 *= -FIX_1_961570560; z4 *= -FIX_0_390180644;
        z3 += z5; z4 += z5;
        tmp0 += z1 + z3; tmp1 += z2 + z4; tmp2 += z2 + z3; tmp3 += z1 + z4;
        const int n = CONST_BITS + PASS1_BITS + 3;
        o[0] = idct_limit(descale(tmp10 + tmp3, n));
        o[7] = idct_limit(descale(tmp10 - tmp3, n));
        o[1] = idct_limit(descale(tmp11 + tmp2, n));
        o[6] = idct_limit(descale(tmp11 - tmp2, n));
        o[2] = idct_limit(descale(tmp12 + tmp1, n));
        o[5] = idct_limit(descale(tmp12 - tmp1, n));
        o[3] = idct_limit(descale(tmp13 + tmp0, n));
        o[4] = idct_limit(descale(tmp13 - tmp0, n));
    }
}

/* Upsamples plane (pw x ph valid samples, row stride ps) by (fx, fy) into out (W x H). */
static void upsample(const uint8_t *pl, size_t ps, int pw, int ph, int fx, int fy, uint8_t *out, int W, int H) {
    uint8_t *row = (uint8_t *)malloc((size_t)pw * 2 + 2);   /* one fancy-upsampled row */
    if (fx == 1 && fy == 1) {
        for (int y = 0; y < H; y++) memcpy(out + (size_t)y * W, pl + (size_t)y * ps, (size_t)W);
    } else if (fx == 2 && fy == 1 && pw > 2 && row) {
        for (int y = 0; y < H; y++) {
            const uint8_t *in = pl + (size_t)y * ps;
            uint8_t *o = row;
            *o++ = in[0];
            *o++ = (uint8_t)((in[0] * 3 + in[1] + 2) >> 2);
            for (int x = 1; x < pw - 1; x++) {
                int v = in[x] * 3;
                *o++ = (uint8_t)((v + in[x - 1] + 1) >> 2);
                *o++ = (uint8_t)((v + in[x + 1] + 2) >> 2);
            }
            *o++ = (uint8_t)((in[pw - 1] * 3 + in[pw - 2] + 1) >> 2);
            *o++ = in[pw - 1];
            memcpy(out + (size_t)y * W, row, (size_t)W);
        }
    } else if (fx == 1 && fy == 2) {
        for (int y = 0; y < H; y++) {
            int iy = y / 2, near = iy, far = (y & 1) ? (iy + 1 < ph ? iy + 1 : ph - 1) : (iy > 0 ? iy - 1 : 0);
            int bias = (y & 1) ? 2 : 1;
            const uint8_t *a = pl + (size_t)near * ps, *b = pl + (size_t)far * ps;
            for (int x = 0; x < W; x++) out[(size_t)y * W + x] = (uint8_t)((a[x] * 3 + b[x] + bias) >> 2);
        }
    } else if (fx == 2 && fy == 2 && pw > 2 && row) {
        for (int y = 0; y < H; y++) {
            int iy = y / 2, far = (y & 1) ? (iy + 1 < ph ? iy + 1 : ph - 1) : (iy > 0 ? iy - 1 : 0);
            const uint8_t *a = pl + (size_t)iy * ps, *b = pl + (size_t)far * ps;
            uint8_t *o = row;
            int this_s = a[0] * 3 + b[0], next_s = a[1] * 3 + b[1], last_s;
            *o++ = (uint8_t)((this_s * 4 + 8) >> 4);
            *o++ = (uint8_t)((this_s * 3 + next_s + 7) >> 4);
            last_s = this_s; this_s = next_s;
            for (int x = 2; x < pw; x++) {
                next_s = a[x] * 3 + b[x];
                *o++ = (uint8_t)((this_s * 3 + last_s + 8) >> 4);
                *o++ = (uint8_t)((this_s * 3 + next_s + 7) >> 4);
                last_s = this_s; this_s = next_s;
            }
            *o++ = (uint8_t)((this_s * 3 + last_s + 8) >> 4);
            *o++ = (uint8_t)((this_s * 4 + 7) >> 4);
            memcpy(out + (size_t)y * W, row, (size_t)W);
        }
    } else {   /* replicate (libjpeg's h2v1/h2v2_upsample, int_upsample) */
        for (int y = 0; y < H; y++) {
            const uint8_t *in = pl + (size_t)(y / fy) * ps;
            for (int x = 0; x < W; x++) out[(size_t)y * W + x] = in[x / fx];
        }
    }
    free(row);
}

static uint8_t clamp255(int v) { return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); }

/* ---------------------------------------------------------------------------------------- */
/* Markers                                                                                   */
/* ---------------------------------------------------------------------------------------- */
static unsigned be16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }

static MsStatus read_sof(Jpeg *j, const uint8_t *p, size_t n) {
    if (j->ncomp) return jerr(j, "has a second SOF");
    if (n < 6) return jerr(j, "SOF too short");
    if (p[0] != 8) {
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: JPEG sample precision %d not supported (8 only)", j->name, p[0]);
    }
    j->h = (int)be16(p + 1);
    j->w = (int)be16(p + 3);
    j->ncomp = p[5];
    if (j->w == 0 || j->h == 0)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: JPEG size %dx%d (zero height needs DNL, not supported)", j->name, j->w, j->h);
    if ((size_t)j->w * (size_t)j->h > MS_IMAGE_MAX_PIXELS)
        return ms_errorf(MS_ERR_FORMAT, "%s: JPEG size %dx%d exceeds %zu pixels", j->name, j->w, j->h, MS_IMAGE_MAX_PIXELS);
    if (j->ncomp != 1 && j->ncomp != 3)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: JPEG with %d components (1 or 3 supported; CMYK is not)", j->name, j->ncomp);
    if (n != 6 + 3 * (size_t)j->ncomp) return jerr(j, "SOF length does not match its component count");
    j->hmax = j->vmax = 1;
    for (int i = 0; i < j->ncomp; i++) {
        JComp *c = &j->c[i];
        c->id = p[6 + 3 * i];
        c->h = p[7 + 3 * i] >> 4;
        c->v = p[7 + 3 * i] & 15;
        c->tq = p[8 + 3 * i];
        if (c->h < 1 || c->h > 4 || c->v < 1 || c->v > 4) return jerr(j, "sampling factor outside 1..4");
        if (c->tq > 3) return jerr(j, "quantization table index > 3");
        for (int k = 0; k < i; k++) if (j->c[k].id == c->id) return jerr(j, "duplicate component id");
        if (c->h > j->hmax) j->hmax = c->h;
        if (c->v > j->vmax) j->vmax = c->v;
    }
    j->mcux = (j->w + 8 * j->hmax - 1) / (8 * j->hmax);
    j->mcuy = (j->h + 8 * j->vmax - 1) / (8 * j->vmax);
    size_t blocks = 0;
    for (int i = 0; i < j->ncomp; i++) {
        JComp *c = &j->c[i];
        if (j->hmax % c->h || j->vmax % c->v)
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s: JPEG sampling factors %dx%d do not divide %dx%d", j->name, c->h, c->v, j->hmax, j->vmax);
        c->bw = j->mcux * c->h;
        c->bh = j->mcuy * c->v;
        c->cw = (int)(((size_t)j->w * (size_t)c->h + (size_t)j->hmax - 1) / (size_t)j->hmax);
        c->ch = (int)(((size_t)j->h * (size_t)c->v + (size_t)j->vmax - 1) / (size_t)j->vmax);
        blocks += (size_t)c->bw * (size_t)c->bh;
    }
    /* each coded block needs >= 1 bit, and at least 1/16 of the allocated blocks are coded */
    size_t left = j->len - j->pos;
    if (blocks / 128 > left + 64)
        return ms_errorf(MS_ERR_FORMAT, "%s: JPEG claims %dx%d (%zu blocks) but only %zu bytes follow", j->name, j->w, j->h, blocks, left);
    for (int i = 0; i < j->ncomp; i++) {
        JComp *c = &j->c[i];
        c->coef = (int16_t *)calloc((size_t)c->bw * (size_t)c->bh * 64, sizeof(int16_t));
        if (!c->coef) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory for %dx%d JPEG", j->name, j->w, j->h);
    }
    return MS_OK;
}

static MsStatus read_dht(Jpeg *j, const uint8_t *p, size_t n) {
    while (n > 0) {
        if (n < 17) return jerr(j, "DHT too short");
        int tc = p[0] >> 4, th = p[0] & 15, total = 0;
        if (tc > 1 || th > 3) return jerr(j, "DHT class/index out of range");
        for (int i = 0; i < 16; i++) total += p[1 + i];
        if (total > 256 || (size_t)(17 + total) > n) return jerr(j, "DHT value count too large");
        MsStatus st = build_huff(j, tc ? &j->hac[th] : &j->hdc[th], p + 1, p + 17, total, tc == 0);
        if (st != MS_OK) return st;
        p += 17 + total;
        n -= 17 + (size_t)total;
    }
    return MS_OK;
}

static MsStatus read_dqt(Jpeg *j, const uint8_t *p, size_t n) {
    while (n > 0) {
        int pq = p[0] >> 4, tq = p[0] & 15;
        size_t need = pq ? 129 : 65;
        if (pq > 1 || tq > 3) return jerr(j, "DQT precision/index out of range");
        if (n < need) return jerr(j, "DQT too short");
        for (int k = 0; k < 64; k++)
            j->qt[tq][zigzag[k]] = (uint16_t)(pq ? be16(p + 1 + 2 * k) : p[1 + k]);
        j->qt_defined[tq] = 1;
        p += need;
        n -= need;
    }
    return MS_OK;
}

static MsStatus read_sos(Jpeg *j, const uint8_t *p, size_t n) {
    JComp *sc[4];
    if (!j->ncomp) return jerr(j, "SOS before SOF");
    if (n < 1) return jerr(j, "SOS too short");
    int ns = p[0];
    if (ns < 1 || ns > j->ncomp || n != 4 + 2 * (size_t)ns) return jerr(j, "SOS component count/length wrong");
    int blocks_per_mcu = 0;
    for (int i = 0; i < ns; i++) {
        int id = p[1 + 2 * i], k;
        for (k = 0; k < j->ncomp; k++) if (j->c[k].id == id) break;
        if (k == j->ncomp) return jerr(j, "SOS names an unknown component");
        for (int m = 0; m < i; m++) if (sc[m] == &j->c[k]) return jerr(j, "SOS names a component twice");
        sc[i] = &j->c[k];
        sc[i]->td = p[2 + 2 * i] >> 4;
        sc[i]->ta = p[2 + 2 * i] & 15;
        if (sc[i]->td > 3 || sc[i]->ta > 3) return jerr(j, "SOS Huffman table index > 3");
        blocks_per_mcu += sc[i]->h * sc[i]->v;
    }
    if (ns > 1 && blocks_per_mcu > 10) return jerr(j, "more than 10 blocks per MCU");
    int ss = p[1 + 2 * ns], se = p[2 + 2 * ns], ah = p[3 + 2 * ns] >> 4, al = p[3 + 2 * ns] & 15;
    if (j->progressive) {
        if (ss > se || se > 63 || (ss == 0 && se != 0) || (ss > 0 && ns != 1) || ah > 13 || al > 13)
            return jerr(j, "invalid progressive scan parameters");
    } else if (ss != 0 || se != 63 || ah != 0 || al != 0) {
        return jerr(j, "invalid sequential scan parameters");
    }
    for (int i = 0; i < ns; i++) {
        JComp *c = sc[i];
        int need_dc = ss == 0 && ah == 0, need_ac = se > 0;   /* DC refinement needs no table */
        if (need_dc && !j->hdc[c->td].defined) return jerr(j, "scan uses an undefined DC Huffman table");
        if (need_ac && !j->hac[c->ta].defined) return jerr(j, "scan uses an undefined AC Huffman table");
        if (!c->seen) {
            if (j->progressive && ss != 0) return jerr(j, "AC scan before the component's DC scan");
            if (!j->qt_defined[c->tq]) return jerr(j, "component uses an undefined quantization table");
            memcpy(c->q, j->qt[c->tq], sizeof c->q);    /* latched, as libjpeg does */
            c->seen = 1;
        }
    }
    j->pos += n;    /* the entropy-coded data starts after the header */
    return decode_scan(j, sc, ns, ss, se, ah, al);
}

static MsStatus jpeg_run(Jpeg *j) {
    MsStatus st;
    if (j->len < 4 || j->buf[0] != 0xFF || j->buf[1] != 0xD8)
        return ms_errorf(MS_ERR_FORMAT, "%s: not a JPEG file (no SOI marker)", j->name);
    j->pos = 2;
    for (;;) {
        /* find the next marker (libjpeg skips garbage between segments too) */
        while (j->pos < j->len && j->buf[j->pos] != 0xFF) j->pos++;
        while (j->pos < j->len && j->buf[j->pos] == 0xFF) j->pos++;
        if (j->pos >= j->len) return jerr(j, "file ends before EOI (truncated)");
        int m = j->buf[j->pos++];
        if (m == 0xD9) break;                                  /* EOI */
        if (m == 0xD8 || (m >= 0xD0 && m <= 0xD7) || m == 0x01) continue;   /* no payload */
        if (j->len - j->pos < 2) return jerr(j, "marker segment truncated");
        size_t n = be16(j->buf + j->pos);
        if (n < 2 || n > j->len - j->pos) return jerr(j, "marker segment length past the end of the file");
        const uint8_t *p = j->buf + j->pos + 2;
        n -= 2;
        switch (m) {
        case 0xC0: case 0xC1: case 0xC2:
            j->progressive = m == 0xC2;
            j->pos += 2;
            if ((st = read_sof(j, p, n)) != MS_OK) return st;
            j->pos += n;
            break;
        case 0xC4: if ((st = read_dht(j, p, n)) != MS_OK) return st; j->pos += 2 + n; break;
        case 0xDB: if ((st = read_dqt(j, p, n)) != MS_OK) return st; j->pos += 2 + n; break;
        case 0xDD:
            if (n < 2) return jerr(j, "DRI too short");
            j->restart = (int)be16(p);
            j->pos += 2 + n;
            break;
        case 0xDA:
            j->pos += 2;
            if ((st = read_sos(j, p, n)) != MS_OK) return st;
            break;
        case 0xE0:
            if (n >= 5 && memcmp(p, "JFIF\0", 5) == 0) j->saw_jfif = 1;
            j->pos += 2 + n;
            break;
        case 0xEE:
            if (n >= 12 && memcmp(p, "Adobe", 5) == 0) { j->saw_adobe = 1; j->adobe_transform = p[11]; }
            j->pos += 2 + n;
            break;
        case 0xDC:
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s: JPEG DNL marker not supported", j->name);
        default:
            if ((m >= 0xC3 && m <= 0xCF) && m != 0xC4 && m != 0xC8 && m != 0xCC)
                return ms_errorf(MS_ERR_UNSUPPORTED, "%s: JPEG SOF%d (arithmetic, lossless or hierarchical) not supported",
                                 j->name, m - 0xC0);
            j->pos += 2 + n;    /* APPn, COM, DAC, ... skipped */
        }
    }
    if (!j->ncomp) return jerr(j, "has no frame (SOF)");
    for (int i = 0; i < j->ncomp; i++) if (!j->c[i].seen) return jerr(j, "component never coded in any scan");
    return MS_OK;
}

MsStatus ms_jpeg_decode(const uint8_t *buf, size_t len, const char *name, int want_channels,
                        MsImage *img) {
    memset(img, 0, sizeof *img);
    if (want_channels < 0 || want_channels > 4)
        return ms_errorf(MS_ERR_ARG, "%s: asked for %d channels (0..4)", name ? name : "(jpeg)", want_channels);
    Jpeg *j = (Jpeg *)calloc(1, sizeof(Jpeg));
    if (!j) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", name ? name : "(jpeg)");
    j->name = name ? name : "(jpeg)";
    j->buf = buf;
    j->len = len;
    MsStatus st = jpeg_run(j);
    uint8_t *planes[3] = { NULL, NULL, NULL }, *out = NULL;
    size_t npix = (size_t)j->w * (size_t)j->h;
    if (st != MS_OK) goto done;
    /* IDCT every component into a plane of its padded size, then upsample to W x H */
    for (int i = 0; i < j->ncomp && st == MS_OK; i++) {
        JComp *c = &j->c[i];
        size_t ps = (size_t)c->bw * 8;
        uint8_t *plane = (uint8_t *)malloc(ps * (size_t)c->bh * 8);
        planes[i] = (uint8_t *)malloc(npix);
        if (!plane || !planes[i]) { free(plane); st = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", j->name); break; }
        for (int by = 0; by < c->bh; by++)
            for (int bx = 0; bx < c->bw; bx++)
                idct_islow(c->coef + ((size_t)by * c->bw + bx) * 64, c->q, plane + (size_t)by * 8 * ps + (size_t)bx * 8, ps);
        upsample(plane, ps, c->cw, c->ch, j->hmax / c->h, j->vmax / c->v, planes[i], j->w, j->h);
        free(plane);
    }
    if (st != MS_OK) goto done;
    int fch = j->ncomp == 1 ? 1 : 3, och = want_channels ? want_channels : fch;
    out = (uint8_t *)malloc(npix * (size_t)och);
    if (!out) { st = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", j->name); goto done; }
    /* colour transform: JFIF -> YCbCr; Adobe transform 0 -> RGB; else ids 'R','G','B' -> RGB */
    int ycc = j->ncomp == 3;
    if (ycc && !j->saw_jfif) {
        if (j->saw_adobe) ycc = j->adobe_transform != 0;
        else if (j->c[0].id == 'R' && j->c[1].id == 'G' && j->c[2].id == 'B') ycc = 0;
    }
    int32_t cr_r[256], cb_b[256], cr_g[256], cb_g[256];    /* jdcolor.c build_ycc_rgb_table */
    for (int i = 0; i < 256; i++) {
        int32_t x = i - 128;
        cr_r[i] = (int32_t)sra((int64_t)91881 * x + 32768, 16);   /* FIX(1.40200) */
        cb_b[i] = (int32_t)sra((int64_t)116130 * x + 32768, 16);  /* FIX(1.77200) */
        cr_g[i] = -46802 * x;                                     /* -FIX(0.71414) */
        cb_g[i] = -22554 * x + 32768;                             /* -FIX(0.34414), + ONE_HALF */
    }
    for (size_t i = 0; i < npix; i++) {
        int r, g, b;
        if (j->ncomp == 1) {
            r = g = b = planes[0][i];
        } else if (ycc) {
            int y = planes[0][i], cb = planes[1][i], cr = planes[2][i];
            r = clamp255(y + cr_r[cr]);
            g = clamp255(y + (int)sra((int64_t)cb_g[cb] + cr_g[cr], 16));
            b = clamp255(y + cb_b[cb]);
        } else {
            r = planes[0][i]; g = planes[1][i]; b = planes[2][i];
        }
        uint8_t *o = out + i * (size_t)och;
        if (och <= 2) {
            o[0] = j->ncomp == 1 ? (uint8_t)r : (uint8_t)((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
            if (och == 2) o[1] = 255;
        } else {
            o[0] = (uint8_t)r; o[1] = (uint8_t)g; o[2] = (uint8_t)b;
            if (och == 4) o[3] = 255;
        }
    }
    img->w = j->w;
    img->h = j->h;
    img->channels = och;
    img->file_channels = fch;
    img->depth = 8;
    img->data = out;
    out = NULL;
done:
    free(out);
    for (int i = 0; i < 3; i++) free(planes[i]);
    for (int i = 0; i < 4; i++) free(j->c[i].coef);
    free(j);
    return st;
}
