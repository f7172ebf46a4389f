/* tools/zlib.c — DEFLATE (RFC 1951) inflate and deflate, the zlib wrapper (RFC 1950), CRC-32
 * and Adler-32. Written from the RFCs; no code from zlib.
 *
 * Inflate: a 64-bit LSB-first bit buffer; Huffman codes decode through a 9-bit lookup table of
 * bit-reversed codes, longer codes by walking the canonical code (RFC 1951 §3.2.2) one bit at
 * a time. Hostile input: every table is checked for over-subscription and for incompleteness
 * where RFC 1951/zlib forbid it (only a single one-bit code may be incomplete); distances
 * before the output start, lengths past a stored block, reading past the input and writing
 * past max_out are errors naming the input offset. Past the end of the input the reader feeds
 * zero bits and counts them, so decoding never reads out of bounds and truncation is reported
 * as soon as a decoded symbol used a bit that is not there.
 *
 * Deflate: greedy LZ77 over a 32 KiB window with hash chains (3-byte hash), blocks of up to
 * MS_DEFL_BLOCK symbols; each block is written stored, fixed or dynamic, whichever is the
 * fewest bits. Huffman lengths are limited (15 for literal/length and distance, 7 for the
 * code-length code) by halving the frequencies until the tree fits: simple, slightly worse than
 * the optimal package-merge, and correct. */
#include "tools/tools.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* CRC-32 and Adler-32                                                                       */
/* ---------------------------------------------------------------------------------------- */
/* CRC-32/ISO-HDLC: reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF (folded in
 * here, so callers chain with crc = ms_crc32(crc, ...) starting from 0). Table-driven, one
 * byte at a time; the table is built on first use (deterministic, so a race writes the same
 * values). */
static uint32_t crc_table[256];
static int crc_table_ready;

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
    crc_table_ready = 1;
}

uint32_t ms_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    if (!crc_table_ready) crc_init();
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* Adler-32 (RFC 1950 §8.2): s1 = 1 + sum of bytes, s2 = sum of s1, both mod 65521. 5552 is the
 * largest n with 255 n (n+1)/2 + (n+1)(65520) < 2^32, so the sums reduce once per 5552 bytes. */
uint32_t ms_adler32(uint32_t adler, const uint8_t *p, size_t n) {
    uint32_t s1 = adler & 0xFFFF, s2 = adler >> 16;
    while (n > 0) {
        size_t k = n < 5552 ? n : 5552;
        n -= k;
        while (k--) { s1 += *p++; s2 += s1; }
        s1 %= 65521u; s2 %= 65521u;
    }
    return (s2 << 16) | s1;
}

/* ---------------------------------------------------------------------------------------- */
/* Inflate                                                                                   */
/* ---------------------------------------------------------------------------------------- */
#define FAST_BITS 9
#define MAX_BITS 15

typedef struct {
    const uint8_t *in;
    size_t len, pos;      /* pos may run past len: those bytes were fed as zeros */
    uint64_t bits;        /* LSB-first bit buffer */
    int nbits;
} BitIn;

typedef struct {
    uint8_t *buf;
    size_t len, cap, max;
    int growable;
} OutBuf;

typedef struct {
    uint16_t count[MAX_BITS + 1];   /* number of codes of each length */
    uint16_t symbol[288];           /* symbols ordered by code (canonical order) */
    uint16_t fast[1 << FAST_BITS];  /* (len << 9) | symbol for codes <= FAST_BITS; 0: slow path */
} Huff;

static void bits_fill(BitIn *b) {
    while (b->nbits <= 56) {
        uint64_t byte = b->pos < b->len ? b->in[b->pos] : 0;
        b->pos++;
        b->bits |= byte << b->nbits;
        b->nbits += 8;
    }
}

/* Bits consumed so far beyond the real input (0 while all are real). */
static int bits_overrun(const BitIn *b) {
    return b->pos > b->len && (b->pos - b->len) * 8 > (size_t)b->nbits;
}

static size_t bits_offset(const BitIn *b) {    /* byte offset of the next unread bit */
    size_t used = b->pos * 8 - (size_t)b->nbits;
    return used / 8;
}

static uint32_t bits_get(BitIn *b, int n) {      /* n <= 32 */
    if (b->nbits < n) bits_fill(b);
    uint32_t v = (uint32_t)(b->bits & ((((uint64_t)1) << n) - 1));
    b->bits >>= n;
    b->nbits -= n;
    return v;
}

static MsStatus truncated(const BitIn *b) {
    return ms_errorf(MS_ERR_FORMAT, "inflate: stream truncated (input ends at byte %zu)", b->len);
}

/* Builds the decoding tables from code lengths (RFC 1951 §3.2.2). kind: "code-length",
 * "literal/length", "distance". Over-subscribed sets are errors; incomplete sets are errors
 * except a single code of length 1 (or no codes at all) for literal/length and distance, which
 * zlib also accepts; using a missing code is then an error at decode time. */
static MsStatus huff_build(Huff *h, const uint8_t *lens, int n, const char *kind, size_t off) {
    int is_clen = strcmp(kind, "code-length") == 0;
    uint16_t offs[MAX_BITS + 2];
    memset(h->count, 0, sizeof h->count);
    for (int i = 0; i < n; i++) h->count[lens[i]]++;
    h->count[0] = 0;
    int left = 1, max = 0;
    for (int l = 1; l <= MAX_BITS; l++) {
        left <<= 1;
        left -= h->count[l];
        if (left < 0)
            return ms_errorf(MS_ERR_FORMAT, "inflate: over-subscribed %s Huffman code near byte %zu", kind, off);
        if (h->count[l]) max = l;
    }
    int ncodes = 0;
    for (int l = 1; l <= MAX_BITS; l++) ncodes += h->count[l];
    if (left > 0 && ncodes > 0 && (is_clen || !(ncodes == 1 && max == 1)))
        return ms_errorf(MS_ERR_FORMAT, "inflate: incomplete %s Huffman code near byte %zu", kind, off);
    if (ncodes == 0 && is_clen)
        return ms_errorf(MS_ERR_FORMAT, "inflate: empty %s Huffman code near byte %zu", kind, off);
    offs[1] = 0;
    for (int l = 1; l <= MAX_BITS; l++) offs[l + 1] = (uint16_t)(offs[l] + h->count[l]);
    for (int i = 0; i < n; i++) if (lens[i]) h->symbol[offs[lens[i]]++] = (uint16_t)i;
    /* fast table: walk the canonical codes of length <= FAST_BITS */
    memset(h->fast, 0, sizeof h->fast);
    int code = 0, idx = 0;
    for (int l = 1; l <= FAST_BITS; l++) {
        for (int k = 0; k < h->count[l]; k++, code++, idx++) {
            int rev = 0;
            for (int j = 0; j < l; j++) rev |= ((code >> j) & 1) << (l - 1 - j);
            for (int j = rev; j < (1 << FAST_BITS); j += 1 << l)
                h->fast[j] = (uint16_t)((l << 9) | h->symbol[idx]);
        }
        code <<= 1;
    }
    return MS_OK;
}

/* Decodes one symbol; -1 for a bit pattern that is no code (incomplete table). */
static int huff_decode(BitIn *b, const Huff *h) {
    if (b->nbits < MAX_BITS) bits_fill(b);
    int e = h->fast[b->bits & ((1u << FAST_BITS) - 1)];
    if (e) {
        int l = e >> 9;
        b->bits >>= l;
        b->nbits -= l;
        return e & 511;
    }
    /* canonical walk: code of length l is first[l] + index within that length */
    int code = 0, first = 0, index = 0;
    uint64_t bits = b->bits;
    for (int l = 1; l <= MAX_BITS; l++) {
        code |= (int)(bits & 1);
        bits >>= 1;
        int count = h->count[l];
        if (code - first < count) {
            b->bits >>= l;
            b->nbits -= l;
            return h->symbol[index + (code - first)];
        }
        index += count;
        first += count;
        first <<= 1;
        code <<= 1;
    }
    return -1;
}

static MsStatus out_reserve(OutBuf *o, size_t n) {
    size_t need;
    if (!ms_add_ok(o->len, n, &need) || need > o->max)
        return ms_errorf(MS_ERR_FORMAT, "inflate: output exceeds the limit of %zu bytes", o->max);
    if (need <= o->cap) return MS_OK;
    if (!o->growable)
        return ms_errorf(MS_ERR_FORMAT, "inflate: output exceeds the buffer of %zu bytes", o->cap);
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < need) cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
    if (cap > o->max) cap = o->max;
    uint8_t *nb = (uint8_t *)realloc(o->buf, cap ? cap : 1);
    if (!nb) return ms_errorf(MS_ERR_NOMEM, "inflate: cannot grow output to %zu bytes", cap);
    o->buf = nb;
    o->cap = cap;
    return MS_OK;
}

static const uint16_t len_base[29] = { 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
    35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258 };
static const uint8_t len_extra[29] = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
    3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0 };
static const uint16_t dist_base[30] = { 1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129,
    193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577 };
static const uint8_t dist_extra[30] = { 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
    7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13 };
static const uint8_t clen_order[19] = { 16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15 };

static MsStatus inflate_codes(BitIn *b, OutBuf *o, const Huff *lit, const Huff *dist) {
    MsStatus st;
    for (;;) {
        int sym = huff_decode(b, lit);
        if (bits_overrun(b)) return truncated(b);
        if (sym < 0)
            return ms_errorf(MS_ERR_FORMAT, "inflate: invalid literal/length code at byte %zu", bits_offset(b));
        if (sym < 256) {
            if (o->len >= o->cap && (st = out_reserve(o, 1)) != MS_OK) return st;
            o->buf[o->len++] = (uint8_t)sym;
            continue;
        }
        if (sym == 256) return MS_OK;
        sym -= 257;
        if (sym >= 29)
            return ms_errorf(MS_ERR_FORMAT, "inflate: invalid length symbol %d at byte %zu", sym + 257, bits_offset(b));
        size_t len = len_base[sym] + bits_get(b, len_extra[sym]);
        int ds = huff_decode(b, dist);
        if (bits_overrun(b)) return truncated(b);
        if (ds < 0 || ds >= 30)
            return ms_errorf(MS_ERR_FORMAT, "inflate: invalid distance code at byte %zu", bits_offset(b));
        size_t d = dist_base[ds] + bits_get(b, dist_extra[ds]);
        if (bits_overrun(b)) return truncated(b);
        if (d > o->len)
            return ms_errorf(MS_ERR_FORMAT, "inflate: distance %zu reaches before the output start (%zu bytes written) at byte %zu",
                             d, o->len, bits_offset(b));
        if ((st = out_reserve(o, len)) != MS_OK) return st;
        uint8_t *dst = o->buf + o->len;
        const uint8_t *src = dst - d;
        for (size_t i = 0; i < len; i++) dst[i] = src[i];   /* overlapping copy is intended */
        o->len += len;
    }
}

static MsStatus inflate_dynamic_tables(BitIn *b, Huff *lit, Huff *dist) {
    uint8_t lens[286 + 30];
    uint8_t clens[19];
    Huff ch;
    MsStatus st;
    int nlen = (int)bits_get(b, 5) + 257, ndist = (int)bits_get(b, 5) + 1, ncode = (int)bits_get(b, 4) + 4;
    if (bits_overrun(b)) return truncated(b);
    if (nlen > 286 || ndist > 30)
        return ms_errorf(MS_ERR_FORMAT, "inflate: too many length (%d) or distance (%d) codes at byte %zu",
                         nlen, ndist, bits_offset(b));
    memset(clens, 0, sizeof clens);
    for (int i = 0; i < ncode; i++) clens[clen_order[i]] = (uint8_t)bits_get(b, 3);
    if (bits_overrun(b)) return truncated(b);
    if ((st = huff_build(&ch, clens, 19, "code-length", bits_offset(b))) != MS_OK) return st;
    int n = 0;
    while (n < nlen + ndist) {
        int sym = huff_decode(b, &ch);
        if (bits_overrun(b)) return truncated(b);
        if (sym < 0) return ms_errorf(MS_ERR_FORMAT, "inflate: invalid code-length code at byte %zu", bits_offset(b));
        if (sym < 16) { lens[n++] = (uint8_t)sym; continue; }
        int rep, val = 0;
        if (sym == 16) {
            if (n == 0) return ms_errorf(MS_ERR_FORMAT, "inflate: repeat of no previous length at byte %zu", bits_offset(b));
            val = lens[n - 1];
            rep = 3 + (int)bits_get(b, 2);
        } else if (sym == 17) {
            rep = 3 + (int)bits_get(b, 3);
        } else {
            rep = 11 + (int)bits_get(b, 7);
        }
        if (bits_overrun(b)) return truncated(b);
        if (n + rep > nlen + ndist)
            return ms_errorf(MS_ERR_FORMAT, "inflate: code lengths overrun the table at byte %zu", bits_offset(b));
        while (rep--) lens[n++] = (uint8_t)val;
    }
    if (lens[256] == 0)
        return ms_errorf(MS_ERR_FORMAT, "inflate: no end-of-block code at byte %zu", bits_offset(b));
    if ((st = huff_build(lit, lens, nlen, "literal/length", bits_offset(b))) != MS_OK) return st;
    if ((st = huff_build(dist, lens + nlen, ndist, "distance", bits_offset(b))) != MS_OK) return st;
    return MS_OK;
}

static MsStatus inflate_run(const uint8_t *in, size_t in_len, int zlib_header, OutBuf *o) {
    BitIn b;
    MsStatus st;
    Huff *lit = (Huff *)malloc(2 * sizeof(Huff));     /* ~2.3 KB each: keep them off the stack */
    if (!lit) return ms_errorf(MS_ERR_NOMEM, "inflate: out of memory");
    Huff *dist = lit + 1;
    size_t start = 0;
    if (zlib_header) {
        if (in_len < 2) { free(lit); return ms_errorf(MS_ERR_FORMAT, "inflate: zlib header truncated (%zu bytes)", in_len); }
        int cmf = in[0], flg = in[1];
        if ((cmf & 15) != 8 || (cmf >> 4) > 7) {
            free(lit);
            return ms_errorf(MS_ERR_FORMAT, "inflate: zlib header 0x%02x: method %d / window %d, expected deflate (8) with window <= 7",
                             cmf, cmf & 15, cmf >> 4);
        }
        if ((cmf * 256 + flg) % 31 != 0) { free(lit); return ms_errorf(MS_ERR_FORMAT, "inflate: zlib header check bits wrong (0x%02x%02x)", cmf, flg); }
        if (flg & 32) { free(lit); return ms_errorf(MS_ERR_UNSUPPORTED, "inflate: zlib preset dictionary not supported"); }
        start = 2;
    }
    b.in = in + start;
    b.len = in_len - start;
    b.pos = 0;
    b.bits = 0;
    b.nbits = 0;
    int final;
    do {
        final = (int)bits_get(&b, 1);
        int type = (int)bits_get(&b, 2);
        if (bits_overrun(&b)) { st = truncated(&b); goto done; }
        if (type == 0) {
            /* stored: skip to a byte boundary, LEN, NLEN, then LEN raw bytes */
            bits_get(&b, b.nbits & 7);
            size_t at = bits_offset(&b);
            uint32_t len = bits_get(&b, 16), nlen = bits_get(&b, 16);
            if (bits_overrun(&b)) { st = truncated(&b); goto done; }
            if ((len ^ 0xFFFF) != nlen) {
                st = ms_errorf(MS_ERR_FORMAT, "inflate: stored block length 0x%04x does not match its complement 0x%04x at byte %zu",
                               (unsigned)len, (unsigned)nlen, at + start);
                goto done;
            }
            /* the bit buffer now holds whole bytes only: rewind it to the byte position */
            size_t p = bits_offset(&b);
            b.bits = 0;
            b.nbits = 0;
            b.pos = p;
            if (p > b.len || len > b.len - p) { st = truncated(&b); goto done; }
            if ((st = out_reserve(o, len)) != MS_OK) goto done;
            if (len) memcpy(o->buf + o->len, b.in + p, len);   /* o->buf may still be NULL */
            o->len += len;
            b.pos = p + len;
        } else if (type == 1) {
            uint8_t lens[288 + 32];   /* distance codes 30, 31 exist in the fixed code, invalid if used */
            int i = 0;
            for (; i < 144; i++) lens[i] = 8;
            for (; i < 256; i++) lens[i] = 9;
            for (; i < 280; i++) lens[i] = 7;
            for (; i < 288; i++) lens[i] = 8;
            for (; i < 288 + 32; i++) lens[i] = 5;
            if ((st = huff_build(lit, lens, 288, "literal/length", 0)) != MS_OK) goto done;
            if ((st = huff_build(dist, lens + 288, 32, "distance", 0)) != MS_OK) goto done;
            if ((st = inflate_codes(&b, o, lit, dist)) != MS_OK) goto done;
        } else if (type == 2) {
            if ((st = inflate_dynamic_tables(&b, lit, dist)) != MS_OK) goto done;
            if ((st = inflate_codes(&b, o, lit, dist)) != MS_OK) goto done;
        } else {
            st = ms_errorf(MS_ERR_FORMAT, "inflate: invalid block type 3 at byte %zu", bits_offset(&b) + start);
            goto done;
        }
    } while (!final);
    st = MS_OK;
    if (zlib_header) {
        bits_get(&b, b.nbits & 7);
        uint32_t want = 0;
        for (int k = 0; k < 4; k++) want = (want << 8) | bits_get(&b, 8);
        if (bits_overrun(&b)) { st = ms_errorf(MS_ERR_FORMAT, "inflate: zlib stream ends before its Adler-32 checksum"); goto done; }
        uint32_t got = ms_adler32(1, o->buf, o->len);
        if (got != want)
            st = ms_errorf(MS_ERR_FORMAT, "inflate: Adler-32 mismatch: stream says 0x%08x, data gives 0x%08x", (unsigned)want, (unsigned)got);
    }
done:
    free(lit);
    return st;
}

MsStatus ms_inflate(const uint8_t *in, size_t in_len, int zlib_header, size_t max_out,
                    uint8_t **out, size_t *out_len) {
    OutBuf o = { NULL, 0, 0, max_out, 1 };
    *out = NULL;
    *out_len = 0;
    MsStatus st = inflate_run(in, in_len, zlib_header, &o);
    if (st != MS_OK) { free(o.buf); return st; }
    if (!o.buf) o.buf = (uint8_t *)malloc(1);   /* empty output: still a valid pointer */
    if (!o.buf) return ms_errorf(MS_ERR_NOMEM, "inflate: out of memory");
    *out = o.buf;
    *out_len = o.len;
    return MS_OK;
}

MsStatus ms_inflate_into(const uint8_t *in, size_t in_len, int zlib_header, uint8_t *out,
                         size_t cap, size_t *out_len) {
    OutBuf o = { out, 0, cap, cap, 0 };
    MsStatus st = inflate_run(in, in_len, zlib_header, &o);
    *out_len = o.len;
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Deflate                                                                                   */
/* ---------------------------------------------------------------------------------------- */
#define DEFL_BLOCK 16384          /* LZ77 symbols per block */
#define WSIZE 32768
#define HASH_BITS 15

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    uint64_t bits;
    int nbits;
    int oom;
} BitOut;

static void put_byte(BitOut *w, uint8_t v) {
    if (w->len == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 4096;
        uint8_t *nb = w->oom || cap < w->cap ? NULL : (uint8_t *)realloc(w->buf, cap);
        if (!nb) { w->oom = 1; return; }
        w->buf = nb;
        w->cap = cap;
    }
    w->buf[w->len++] = v;
}

static void put_bits(BitOut *w, uint32_t v, int n) {       /* n <= 32, LSB first */
    w->bits |= (uint64_t)v << w->nbits;
    w->nbits += n;
    while (w->nbits >= 8) {
        put_byte(w, (uint8_t)(w->bits & 255));
        w->bits >>= 8;
        w->nbits -= 8;
    }
}

static void put_align(BitOut *w) { if (w->nbits & 7) put_bits(w, 0, 8 - (w->nbits & 7)); }

/* Huffman code lengths for freq[0..n-1], each <= limit. Symbols with freq 0 get length 0,
 * except that at least two symbols always get a code (a complete code every decoder
 * accepts). Plain Huffman by repeatedly merging the two lightest nodes (n <= 288, so O(n^2)
 * is fine); while the deepest leaf is too deep, halve all frequencies (rounding up) and redo. */
static void huff_lengths(const uint32_t *freq_in, int n, int limit, uint8_t *lens) {
    uint32_t freq[288];
    uint64_t w[2 * 288];
    int parent[2 * 288], alive[2 * 288], leaf[288];
    memcpy(freq, freq_in, (size_t)n * sizeof *freq);
    int used = 0;
    for (int i = 0; i < n; i++) used += freq[i] > 0;
    for (int i = 0; used < 2 && i < n; i++) if (!freq[i]) { freq[i] = 1; used++; }
    for (;;) {
        int m = 0;
        for (int i = 0; i < n; i++) if (freq[i]) { leaf[m] = i; w[m] = freq[i]; parent[m] = -1; alive[m] = 1; m++; }
        int nodes = m;
        for (int k = 0; k < m - 1; k++) {
            int a = -1, b = -1;
            for (int j = 0; j < nodes; j++) {
                if (!alive[j]) continue;
                if (a < 0 || w[j] < w[a]) { b = a; a = j; }
                else if (b < 0 || w[j] < w[b]) b = j;
            }
            w[nodes] = w[a] + w[b];
            parent[nodes] = -1;
            alive[nodes] = 1;
            parent[a] = parent[b] = nodes;
            alive[a] = alive[b] = 0;
            nodes++;
        }
        int maxlen = 0;
        memset(lens, 0, (size_t)n);
        for (int j = 0; j < m; j++) {
            int d = 0;
            for (int p = j; parent[p] >= 0; p = parent[p]) d++;
            lens[leaf[j]] = (uint8_t)d;
            if (d > maxlen) maxlen = d;
        }
        if (maxlen <= limit) return;
        for (int i = 0; i < n; i++) if (freq[i]) freq[i] = (freq[i] + 1) / 2;
    }
}

/* Canonical codes (RFC 1951 §3.2.2), bit-reversed for the LSB-first stream. */
static void huff_codes(const uint8_t *lens, int n, uint16_t *codes) {
    int count[MAX_BITS + 1] = { 0 }, next[MAX_BITS + 2];
    for (int i = 0; i < n; i++) count[lens[i]]++;
    count[0] = 0;
    next[1] = 0;
    for (int l = 1; l <= MAX_BITS; l++) next[l + 1] = (next[l] + count[l]) << 1;
    for (int i = 0; i < n; i++) {
        int l = lens[i];
        if (!l) { codes[i] = 0; continue; }
        int c = next[l]++, r = 0;
        for (int j = 0; j < l; j++) r |= ((c >> j) & 1) << (l - 1 - j);
        codes[i] = (uint16_t)r;
    }
}

static int len_sym(int len) {                 /* 3..258 -> 0..28 */
    int s = 28;
    while (len_base[s] > len) s--;
    return s;
}

static int dist_sym(int d) {                  /* 1..32768 -> 0..29 */
    int s = 29;
    while (dist_base[s] > d) s--;
    return s;
}

typedef struct {
    uint16_t lit[DEFL_BLOCK];   /* literal byte or match length */
    uint16_t dist[DEFL_BLOCK];  /* 0 for a literal */
    int n;
} Syms;

/* Run-length codes for the concatenated code lengths (RFC 1951 §3.2.7). out: symbol | extra << 5 */
static int rle_lengths(const uint8_t *lens, int n, uint16_t *out, uint32_t *cfreq) {
    int k = 0;
    for (int i = 0; i < n;) {
        int v = lens[i], run = 1;
        while (i + run < n && lens[i + run] == v) run++;
        int left = run;
        if (v == 0) {
            while (left >= 11) { int r = left > 138 ? 138 : left; out[k++] = (uint16_t)(18 | (r - 11) << 5); cfreq[18]++; left -= r; }
            if (left >= 3) { out[k++] = (uint16_t)(17 | (left - 3) << 5); cfreq[17]++; left = 0; }
        } else {
            out[k++] = (uint16_t)v; cfreq[v]++; left--;
            while (left >= 3) { int r = left > 6 ? 6 : left; out[k++] = (uint16_t)(16 | (r - 3) << 5); cfreq[16]++; left -= r; }
        }
        while (left-- > 0) { out[k++] = (uint16_t)v; cfreq[v]++; }
        i += run;
    }
    return k;
}

static void write_block(BitOut *w, const Syms *s, const uint8_t *raw, size_t raw_len, int final) {
    uint32_t lf[288] = { 0 }, df[30] = { 0 };
    for (int i = 0; i < s->n; i++) {
        if (s->dist[i]) { lf[257 + len_sym(s->lit[i])]++; df[dist_sym(s->dist[i])]++; }
        else lf[s->lit[i]]++;
    }
    lf[256] = 1;
    /* fixed */
    uint8_t flens[288 + 30];
    for (int i = 0; i < 288; i++) flens[i] = (uint8_t)(i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8);
    for (int i = 0; i < 30; i++) flens[288 + i] = 5;
    uint64_t extra = 0, fixed_bits = 3, dyn_bits = 3 + 14;
    for (int i = 0; i < 29; i++) extra += (uint64_t)lf[257 + i] * len_extra[i];
    for (int i = 0; i < 30; i++) extra += (uint64_t)df[i] * dist_extra[i];
    for (int i = 0; i < 286; i++) fixed_bits += (uint64_t)lf[i] * flens[i];
    for (int i = 0; i < 30; i++) fixed_bits += (uint64_t)df[i] * 5;
    fixed_bits += extra;
    /* dynamic */
    uint8_t dl[286 + 30], clens[19];
    uint16_t rle[286 + 30], ccodes[19], lcodes[288], dcodes[30];
    uint32_t cf[19] = { 0 };
    huff_lengths(lf, 286, 15, dl);
    huff_lengths(df, 30, 15, dl + 286);
    int hlit = 286, hdist = 30;
    while (hlit > 257 && dl[hlit - 1] == 0) hlit--;
    while (hdist > 1 && dl[286 + hdist - 1] == 0) hdist--;
    uint8_t seq[286 + 30];
    memcpy(seq, dl, (size_t)hlit);
    memcpy(seq + hlit, dl + 286, (size_t)hdist);
    int nrle = rle_lengths(seq, hlit + hdist, rle, cf);
    huff_lengths(cf, 19, 7, clens);
    int hclen = 19;
    while (hclen > 4 && clens[clen_order[hclen - 1]] == 0) hclen--;
    dyn_bits += 3 * (uint64_t)hclen;
    for (int i = 0; i < nrle; i++) {
        int sym = rle[i] & 31;
        dyn_bits += clens[sym] + (sym == 16 ? 2 : sym == 17 ? 3 : sym == 18 ? 7 : 0);
    }
    for (int i = 0; i < 286; i++) dyn_bits += (uint64_t)lf[i] * dl[i];
    for (int i = 0; i < 30; i++) dyn_bits += (uint64_t)df[i] * dl[286 + i];
    dyn_bits += extra;
    /* stored: each chunk of <= 65535 bytes costs a header, padding to a byte and LEN/NLEN */
    uint64_t nchunks = raw_len ? (raw_len + 65534) / 65535 : 1;
    uint64_t stored_bits = nchunks * (3 + 7 + 32) + 8 * (uint64_t)raw_len;

    if (stored_bits <= fixed_bits && stored_bits <= dyn_bits) {
        size_t off = 0;
        do {
            size_t k = raw_len - off > 65535 ? 65535 : raw_len - off;
            put_bits(w, (uint32_t)(final && off + k == raw_len), 1);
            put_bits(w, 0, 2);
            put_align(w);
            put_bits(w, (uint32_t)k, 16);
            put_bits(w, (uint32_t)k ^ 0xFFFF, 16);
            for (size_t i = 0; i < k; i++) put_byte(w, raw[off + i]);
            off += k;
        } while (off < raw_len);
        return;
    }
    const uint8_t *ll, *dd;
    put_bits(w, (uint32_t)final, 1);
    if (fixed_bits <= dyn_bits) {
        put_bits(w, 1, 2);
        ll = flens;
        dd = flens + 288;
        huff_codes(ll, 288, lcodes);
        huff_codes(dd, 30, dcodes);
    } else {
        put_bits(w, 2, 2);
        put_bits(w, (uint32_t)(hlit - 257), 5);
        put_bits(w, (uint32_t)(hdist - 1), 5);
        put_bits(w, (uint32_t)(hclen - 4), 4);
        for (int i = 0; i < hclen; i++) put_bits(w, clens[clen_order[i]], 3);
        huff_codes(clens, 19, ccodes);
        for (int i = 0; i < nrle; i++) {
            int sym = rle[i] & 31, x = rle[i] >> 5;
            put_bits(w, ccodes[sym], clens[sym]);
            if (sym == 16) put_bits(w, (uint32_t)x, 2);
            else if (sym == 17) put_bits(w, (uint32_t)x, 3);
            else if (sym == 18) put_bits(w, (uint32_t)x, 7);
        }
        ll = dl;
        dd = dl + 286;
        huff_codes(ll, 286, lcodes);
        huff_codes(dd, 30, dcodes);
    }
    for (int i = 0; i < s->n; i++) {
        if (!s->dist[i]) { put_bits(w, lcodes[s->lit[i]], ll[s->lit[i]]); continue; }
        int ls = len_sym(s->lit[i]), ds = dist_sym(s->dist[i]);
        put_bits(w, lcodes[257 + ls], ll[257 + ls]);
        put_bits(w, (uint32_t)(s->lit[i] - len_base[ls]), len_extra[ls]);
        put_bits(w, dcodes[ds], dd[ds]);
        put_bits(w, (uint32_t)(s->dist[i] - dist_base[ds]), dist_extra[ds]);
    }
    put_bits(w, lcodes[256], ll[256]);
}

MsStatus ms_deflate(const uint8_t *in, size_t in_len, int zlib_header, int level,
                    uint8_t **out, size_t *out_len) {
    BitOut w = { NULL, 0, 0, 0, 0, 0 };
    *out = NULL;
    *out_len = 0;
    if (level < 0 || level > 9) return ms_errorf(MS_ERR_ARG, "deflate: level %d not in 0..9", level);
    if (zlib_header) { put_byte(&w, 0x78); put_byte(&w, 0x9C); }   /* 32K window, (0x789C % 31) == 0 */
    if (level == 0 || in_len == 0) {
        size_t off = 0;
        do {   /* stored blocks straight from the input */
            size_t k = in_len - off > 65535 ? 65535 : in_len - off;
            put_bits(&w, off + k == in_len, 1);
            put_bits(&w, 0, 2);
            put_align(&w);
            put_bits(&w, (uint32_t)k, 16);
            put_bits(&w, (uint32_t)k ^ 0xFFFF, 16);
            for (size_t i = 0; i < k; i++) put_byte(&w, in[off + i]);
            off += k;
        } while (off < in_len);
    } else {
        int max_chain = 4 << (level - 1);    /* 4 .. 1024 candidates per position */
        size_t *head = (size_t *)calloc((size_t)1 << HASH_BITS, sizeof(size_t));
        size_t *prev = (size_t *)calloc(WSIZE, sizeof(size_t));
        Syms *s = (Syms *)malloc(sizeof(Syms));
        if (!head || !prev || !s) { free(head); free(prev); free(s); free(w.buf); return ms_errorf(MS_ERR_NOMEM, "deflate: out of memory"); }
        s->n = 0;
        size_t block_start = 0, i = 0;
        while (i < in_len) {
            size_t best_len = 0, best_dist = 0;
            if (i + 3 <= in_len) {
                uint32_t h = ((uint32_t)in[i] << 10 ^ (uint32_t)in[i + 1] << 5 ^ in[i + 2]) & ((1u << HASH_BITS) - 1);
                size_t cand = head[h], maxl = in_len - i < 258 ? in_len - i : 258;
                for (int c = 0; c < max_chain && cand; c++) {
                    size_t p = cand - 1;
                    if (i - p > WSIZE) break;
                    if (in[p + best_len] == in[i + best_len]) {
                        size_t l = 0;
                        while (l < maxl && in[p + l] == in[i + l]) l++;
                        if (l > best_len) { best_len = l; best_dist = i - p; if (l == maxl) break; }
                    }
                    size_t nx = prev[p & (WSIZE - 1)];
                    if (nx >= cand) break;          /* chains only go back in time */
                    cand = nx;
                }
            }
            size_t adv = best_len >= 3 ? best_len : 1;
            if (best_len >= 3) { s->lit[s->n] = (uint16_t)best_len; s->dist[s->n] = (uint16_t)best_dist; }
            else { s->lit[s->n] = in[i]; s->dist[s->n] = 0; }
            s->n++;
            for (size_t k = 0; k < adv; k++, i++) {
                if (i + 3 > in_len) continue;
                uint32_t h = ((uint32_t)in[i] << 10 ^ (uint32_t)in[i + 1] << 5 ^ in[i + 2]) & ((1u << HASH_BITS) - 1);
                prev[i & (WSIZE - 1)] = head[h];
                head[h] = i + 1;
            }
            if (s->n == DEFL_BLOCK || i == in_len) {
                write_block(&w, s, in + block_start, i - block_start, i == in_len);
                s->n = 0;
                block_start = i;
            }
        }
        free(head);
        free(prev);
        free(s);
    }
    put_align(&w);
    if (zlib_header) {
        uint32_t a = ms_adler32(1, in, in_len);
        for (int k = 3; k >= 0; k--) put_byte(&w, (uint8_t)(a >> (8 * k)));
    }
    if (w.oom) { free(w.buf); return ms_errorf(MS_ERR_NOMEM, "deflate: out of memory"); }
    *out = w.buf;
    *out_len = w.len;
    return MS_OK;
}
