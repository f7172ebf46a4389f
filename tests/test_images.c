/* tests/test_images.c — zlib (CRC-32, Adler-32, inflate, deflate), PNG and JPEG codecs.
 *
 * References (tools/ref/gen_image_golden.py, Pillow 9.4 + libjpeg-turbo 2.1.5 + zlib):
 *   tests/data/images/manifest.txt        synthetic PNG/JPEG files and Pillow's pixels:
 *                                         PNG must match exactly, JPEG within +-1
 *   tests/data/images/shared_manifest.txt the images of ../shared/mixofshow-data: CRC-32 and
 *                                         sum of Pillow's pixels (PNG), Pillow's pixels as a
 *                                         PNG (JPEG, +-1); skipped when ../shared is absent
 *   tests/data/bad/images/LIST.txt        hostile files: each must fail with a message
 * Run from the repository root (make test does). */
#include "tests/test.h"
#include "tools/tools.h"

#include <stdint.h>

#define IMG_DIR "tests/data/images/"
#define BAD_DIR "tests/data/bad/images/"

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0;
    uint8_t *b = (uint8_t *)malloc(cap);
    for (;;) {
        if (len == cap) { cap *= 2; b = (uint8_t *)realloc(b, cap); }
        if (!b) { fclose(f); return NULL; }
        size_t got = fread(b + len, 1, cap - len, f);
        len += got;
        if (!got) break;
    }
    fclose(f);
    *n = len;
    return b;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* ---- CRC-32 / Adler-32 known values ---- */
static void test_checksums(void) {
    const uint8_t *s = (const uint8_t *)"123456789";
    check(ms_crc32(0, s, 9) == 0xCBF43926u, "crc32(\"123456789\") = 0x%08x (want 0xcbf43926)", (unsigned)ms_crc32(0, s, 9));
    const char *fox = "The quick brown fox jumps over the lazy dog";
    uint32_t c = ms_crc32(0, (const uint8_t *)fox, strlen(fox));
    check(c == 0x414FA339u, "crc32(fox) = 0x%08x (want 0x414fa339)", (unsigned)c);
    uint32_t c2 = ms_crc32(ms_crc32(0, (const uint8_t *)fox, 10), (const uint8_t *)fox + 10, strlen(fox) - 10);
    check(c2 == c, "crc32 chained in two pieces");
    check(ms_crc32(0, s, 0) == 0, "crc32 of nothing is 0");
    uint32_t a = ms_adler32(1, (const uint8_t *)"Wikipedia", 9);
    check(a == 0x11E60398u, "adler32(\"Wikipedia\") = 0x%08x (want 0x11e60398)", (unsigned)a);
    /* long input: crosses the 5552-byte reduction boundary; reference from zlib.adler32 */
    uint8_t *ff = (uint8_t *)malloc(100000);
    memset(ff, 0xFF, 100000);
    a = ms_adler32(1, ff, 100000);
    check(a == 0x149A302Cu, "adler32 of 100000 x 0xFF = 0x%08x (want 0x149a302c, zlib.adler32)", (unsigned)a);
    free(ff);
}

/* ---- inflate / deflate ---- */
static void roundtrip(const char *what, const uint8_t *x, size_t n) {
    for (int zl = 0; zl <= 1; zl++)
        for (int level = 0; level <= 9; level += (level == 0 ? 1 : level == 1 ? 5 : 3)) {
            uint8_t *z, *y;
            size_t zn, yn;
            MsStatus st = ms_deflate(x, n, zl, level, &z, &zn);
            if (!check(st == MS_OK, "deflate %s level %d: %s", what, level, ms_last_error())) continue;
            st = ms_inflate(z, zn, zl, n, &y, &yn);
            int ok = st == MS_OK && yn == n && (n == 0 || memcmp(x, y, n) == 0);
            check(ok, "inflate(deflate(%s)) == x  (%s, level %d: %zu -> %zu bytes)%s%s", what, zl ? "zlib" : "raw", level, n, zn,
                  st ? " " : "", st ? ms_last_error() : "");
            if (st == MS_OK) free(y);
            free(z);
        }
}

static void test_deflate(void) {
    MsRng r;
    ms_rng_seed(&r, 7);
    size_t n = 300000;
    uint8_t *x = (uint8_t *)malloc(n);
    for (size_t i = 0; i < n; i++) x[i] = (uint8_t)ms_rng_u64(&r);
    roundtrip("random 300000", x, n);
    for (size_t i = 0; i < n; i++) x[i] = (uint8_t)("abcabcabd"[i % 9]);
    roundtrip("repetitive 300000", x, n);
    for (size_t i = 0; i < n; i++) x[i] = (uint8_t)(ms_rng_u64(&r) % 4 + (i / 5000 % 3) * 60);
    roundtrip("skewed 300000", x, n);
    for (size_t i = 0; i < n; i++) x[i] = (i / 40000) % 2 ? (uint8_t)ms_rng_u64(&r) : (uint8_t)(i % 251);
    roundtrip("mixed blocks 300000", x, n);
    roundtrip("empty", x, 0);
    roundtrip("1 byte", x, 1);
    roundtrip("258 bytes", x, 258);
    /* compression actually happens */
    for (size_t i = 0; i < n; i++) x[i] = (uint8_t)("abcabcabd"[i % 9]);
    uint8_t *z;
    size_t zn;
    ms_deflate(x, n, 1, 6, &z, &zn);
    check(zn < n / 100, "repetitive 300000 bytes deflate to %zu (< 1%%)", zn);
    /* output caps */
    uint8_t *y;
    size_t yn;
    MsStatus st = ms_inflate(z, zn, 1, n - 1, &y, &yn);
    check(st != MS_OK, "inflate past max_out fails: %s", ms_last_error());
    uint8_t *buf = (uint8_t *)malloc(n);
    st = ms_inflate_into(z, zn, 1, buf, n, &yn);
    check(st == MS_OK && yn == n && memcmp(buf, x, n) == 0, "inflate_into exact buffer");
    st = ms_inflate_into(z, zn, 1, buf, n - 1, &yn);
    check(st != MS_OK, "inflate_into a buffer 1 byte short fails: %s", ms_last_error());
    free(buf);
    free(z);
    /* a stream written by Python's zlib 1.2.13 (fixed Huffman with a long match); dynamic
     * Huffman streams from zlib come with every PNG of the manifest */
    static const uint8_t zfixed[] = { 0x78, 0x9c, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x57, 0xc8, 0x40, 0x27, 0x01,
                                      0x68, 0x03, 0x08, 0xb1 };   /* zlib.compress(b"hello hello hello hello") */
    st = ms_inflate(zfixed, sizeof zfixed, 1, 1000, &y, &yn);
    check(st == MS_OK && yn == 23 && memcmp(y, "hello hello hello hello", 23) == 0, "inflate zlib.compress(b\"hello\"*4)");
    if (st == MS_OK) free(y);
    free(x);
}

/* ---- decoders against Pillow ---- */
static MsStatus decode_file(const char *path, int ch, int depth, MsImage *img) {
    size_t n;
    uint8_t *b = slurp(path, &n);
    if (!b) return ms_errorf(MS_ERR_IO, "%s: cannot read", path);
    MsStatus st = ends_with(path, ".png") ? ms_png_decode(b, n, path, ch, depth, img) : ms_jpeg_decode(b, n, path, ch, img);
    free(b);
    return st;
}

/* +-1 comparison; returns max |diff|, counts differing samples */
static int compare_u8(const uint8_t *a, const uint8_t *b, size_t n, size_t *ndiff) {
    int mx = 0;
    *ndiff = 0;
    for (size_t i = 0; i < n; i++) {
        int d = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i];
        if (d) (*ndiff)++;
        if (d > mx) mx = d;
    }
    return mx;
}

static void test_manifest(void) {
    FILE *f = fopen(IMG_DIR "manifest.txt", "r");
    if (!check(f != NULL, "open " IMG_DIR "manifest.txt")) return;
    char line[512];
    int npng = 0, njpg = 0, jpg_max = 0;
    size_t jpg_diff = 0, jpg_samples = 0;
    while (fgets(line, sizeof line, f)) {
        char file[128], ref[128], kind[16];
        int ch, depth, w, h;
        if (line[0] == '#' || sscanf(line, "%127s %d %d %d %d %127s %15s", file, &ch, &depth, &w, &h, ref, kind) != 7) continue;
        char path[300], rpath[300];
        snprintf(path, sizeof path, IMG_DIR "%s", file);
        snprintf(rpath, sizeof rpath, IMG_DIR "%s", ref);
        MsImage img;
        MsStatus st = decode_file(path, ch, depth, &img);
        if (!check(st == MS_OK, "decode %s (%d ch, %d-bit): %s", file, ch, depth, st ? ms_last_error() : "")) continue;
        size_t rn, n = (size_t)w * h * ch * (depth / 8);
        uint8_t *want = slurp(rpath, &rn);
        if (!check(want && rn == n && img.w == w && img.h == h && img.channels == ch, "%s: size %dx%dx%d vs Pillow %dx%dx%d", file,
                   img.w, img.h, img.channels, w, h, ch)) { free(want); ms_image_free(&img); continue; }
        if (depth == 16) {   /* reference is little-endian uint16 */
            const uint16_t *got = (const uint16_t *)img.data;
            size_t bad = 0;
            for (size_t i = 0; i < n / 2; i++) bad += got[i] != (uint16_t)(want[2 * i] | want[2 * i + 1] << 8);
            check(bad == 0, "%-22s %d ch 16-bit == Pillow (%zu samples differ)", file, ch, bad);
            npng++;
        } else if (strcmp(kind, "exact") == 0) {
            size_t nd;
            int mx = compare_u8((const uint8_t *)img.data, want, n, &nd);
            check(nd == 0, "%-22s %d ch == Pillow (%zu of %zu samples differ, max %d)", file, ch, nd, n, mx);
            npng++;
        } else {
            size_t nd;
            int mx = compare_u8((const uint8_t *)img.data, want, n, &nd);
            check(mx <= 1, "%-22s %d ch vs Pillow/libjpeg-turbo: max diff %d, %zu of %zu samples differ", file, ch, mx, nd, n);
            if (mx > jpg_max) jpg_max = mx;
            jpg_diff += nd;
            jpg_samples += n;
            njpg++;
        }
        free(want);
        ms_image_free(&img);
    }
    fclose(f);
    printf("  synthetic: %d PNG decodes compared exactly; %d JPEG decodes: max diff %d, %zu of %zu samples differ\n", npng, njpg,
           jpg_max, jpg_diff, jpg_samples);
    check(npng > 50 && njpg > 20, "manifest has the expected number of entries (%d PNG, %d JPEG)", npng, njpg);
}

static void test_shared(void) {
    char mpath[] = IMG_DIR "shared_manifest.txt";
    FILE *f = fopen(mpath, "r");
    if (!check(f != NULL, "open %s", mpath)) return;
    char line[1024];
    int done = 0, skipped = 0;
    while (fgets(line, sizeof line, f)) {
        char rel[600], fmt[16], mode[16], ref[200];
        int ch, w, h;
        unsigned crc;
        long long sum;   /* sscanf of %lld: the sum of pixels may exceed 2^31 */
        if (line[0] == '#' || sscanf(line, "%599s %15s %d %d %d %15s %x %lld %199s", rel, fmt, &ch, &w, &h, mode, &crc, &sum, ref) != 9) continue;
        char path[900];
        snprintf(path, sizeof path, "%s/mixofshow-data/%s", test_shared_dir(), rel);
        FILE *t = fopen(path, "rb");
        if (!t) { skipped++; continue; }
        fclose(t);
        MsImage img;
        double t0 = ms_time();
        MsStatus st = ms_image_read(path, ch, &img);
        double dt = ms_time() - t0;
        if (!check(st == MS_OK, "decode %s: %s", rel, st ? ms_last_error() : "")) continue;
        size_t n = (size_t)img.w * img.h * img.channels;
        if (!check(img.w == w && img.h == h && img.channels == ch, "%s size %dx%dx%d", rel, img.w, img.h, img.channels)) { ms_image_free(&img); continue; }
        if (strcmp(fmt, "PNG") == 0) {
            uint32_t c = ms_crc32(0, (const uint8_t *)img.data, n);
            long long s = 0;
            for (size_t i = 0; i < n; i++) s += ((const uint8_t *)img.data)[i];
            check(c == crc && s == sum, "%s (%s %dx%d) == Pillow: crc32 %08x/%08x sum %lld/%lld (%.1f ms)", rel, mode, w, h,
                  (unsigned)c, crc, s, sum, dt * 1e3);
        } else {
            char rp[300];
            MsImage want;
            snprintf(rp, sizeof rp, IMG_DIR "%s", ref);
            if (check(decode_file(rp, ch, 8, &want) == MS_OK, "decode %s", rp)) {
                size_t nd;
                int mx = compare_u8((const uint8_t *)img.data, (const uint8_t *)want.data, n, &nd);
                check(mx <= 1, "%s (JPEG %dx%d) vs Pillow: max diff %d, %zu of %zu samples differ (%.1f ms)", rel, w, h, mx, nd, n, dt * 1e3);
                printf("  %s: JPEG max diff %d, %zu of %zu samples differ, %.1f ms\n", rel, mx, nd, n, dt * 1e3);
                ms_image_free(&want);
            }
        }
        done++;
        ms_image_free(&img);
    }
    fclose(f);
    if (skipped) printf("  shared images: %d checked, %d SKIPPED (%s/mixofshow-data not found)\n", done, skipped, test_shared_dir());
    else printf("  shared images: %d checked against Pillow\n", done);
}

/* ---- PNG encode -> decode ---- */
static void test_png_roundtrip(void) {
    static const int sizes[][2] = { { 1, 1 }, { 37, 23 }, { 256, 3 }, { 2, 300 } };
    MsRng r;
    ms_rng_seed(&r, 11);
    for (int s = 0; s < 4; s++)
        for (int ch = 1; ch <= 4; ch++) {
            int w = sizes[s][0], h = sizes[s][1];
            size_t n = (size_t)w * h * ch;
            uint8_t *px = (uint8_t *)malloc(n);
            for (size_t i = 0; i < n; i++)   /* smooth + noise: every filter type wins somewhere */
                px[i] = (uint8_t)((i % 7 == 0) ? ms_rng_u64(&r) : (i / (size_t)ch) % (size_t)w * 3 + (i / ((size_t)w * ch)) * 5);
            uint8_t *png;
            size_t pn;
            MsImage img;
            MsStatus st = ms_png_encode(px, w, h, ch, &png, &pn);
            if (check(st == MS_OK, "png encode %dx%dx%d", w, h, ch)) {
                st = ms_png_decode(png, pn, "roundtrip", 0, 8, &img);
                check(st == MS_OK && img.w == w && img.h == h && img.channels == ch && memcmp(img.data, px, n) == 0,
                      "png encode->decode %dx%d %d ch (%zu bytes) identical", w, h, ch, pn);
                if (st == MS_OK) ms_image_free(&img);
                st = ms_png_decode(png, pn, "roundtrip16", 0, 16, &img);   /* 8-bit samples widen by 257 */
                size_t bad = st == MS_OK ? 0 : n;
                for (size_t i = 0; st == MS_OK && i < n; i++) bad += ((const uint16_t *)img.data)[i] != px[i] * 257;
                check(bad == 0 && img.depth == 16, "png decode %dx%d %d ch as 16-bit == 257 * 8-bit (%zu differ)", w, h, ch, bad);
                if (st == MS_OK) ms_image_free(&img);
                free(png);
            }
            free(px);
        }
    /* through a file: ms_png_write (temp + rename) and ms_image_read */
    uint8_t px[4 * 5 * 3];
    for (int i = 0; i < 60; i++) px[i] = (uint8_t)(i * 17);
    const char *path = "build/test_images_tmp.png";
    MsStatus st = ms_png_write(path, px, 5, 4, 3);
    if (st != MS_OK) { path = "test_images_tmp.png"; st = ms_png_write(path, px, 5, 4, 3); }
    if (check(st == MS_OK, "ms_png_write %s: %s", path, st ? ms_last_error() : "")) {
        MsImage img;
        st = ms_image_read(path, 3, &img);
        check(st == MS_OK && memcmp(img.data, px, 60) == 0, "ms_png_write then ms_image_read");
        if (st == MS_OK) ms_image_free(&img);
        remove(path);
    }
}

/* ---- hostile files ---- */
static void test_bad(void) {
    FILE *f = fopen(BAD_DIR "LIST.txt", "r");
    if (!check(f != NULL, "open " BAD_DIR "LIST.txt")) return;
    char name[256];
    int n = 0;
    while (fscanf(f, "%255s", name) == 1) {
        char path[400];
        size_t len;
        snprintf(path, sizeof path, BAD_DIR "%s", name);
        uint8_t *b = slurp(path, &len);
        if (!check(b != NULL, "read %s", path)) continue;
        MsStatus st;
        ms_clear_error();
        if (ends_with(name, ".deflate") || ends_with(name, ".zlib")) {
            uint8_t *out;
            size_t on;
            st = ms_inflate(b, len, ends_with(name, ".zlib"), (size_t)16 << 20, &out, &on);
            if (st == MS_OK) free(out);
        } else {
            MsImage img;
            MsStatus st2 = ms_image_decode(b, len, name, 0, &img);   /* by magic */
            if (st2 == MS_OK) ms_image_free(&img);
            st = ends_with(name, ".png") ? ms_png_decode(b, len, name, 3, 8, &img) : ms_jpeg_decode(b, len, name, 3, &img);
            if (st == MS_OK) ms_image_free(&img);
            if (st2 == MS_OK) st = MS_OK;   /* both must refuse; the message shown is the decoder's own */
        }
        check(st != MS_OK && ms_last_error()[0], "%-28s refused: %s", name, ms_last_error());
        if (st != MS_OK && !test_is_verbose()) printf("  bad %-28s -> %s\n", name, ms_last_error());
        free(b);
        n++;
    }
    fclose(f);
    check(n >= 40, "%d hostile files tried", n);
}

int main(void) {
    test_checksums();
    test_deflate();
    test_manifest();
    test_shared();
    test_png_roundtrip();
    test_bad();
    return test_summary("test_images");
}
