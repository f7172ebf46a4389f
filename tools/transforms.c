/* tools/transforms.c — the ED-LoRA instance_transform of the official Mix-of-Show code
 * (mixofshow/data/pil_transform.py at 51270fd), bit for bit, with the libraries it calls:
 *   Pillow 9.4 Image.resize (libImaging/Resample.c BILINEAR, Geometry.c ImagingScaleAffine for
 *   NEAREST), Image.crop (Crop.c: zero outside), torchvision 0.14 F.resize size rules,
 *   RandomCrop (torch.randint), F.to_tensor, F.normalize, and OpenCV 4.6 cv2.resize INTER_LINEAR
 *   on float64 (the official `cv2.resize(mask, (S//8, S//8), cv2.INTER_NEAREST)` passes the flag
 *   as the `dst` argument, so the default INTER_LINEAR runs).
 * Draws: Python's random (PyRandom) and the torch global generator (MsTorchRng), in the order
 * the official code makes them. Golden: tools/ref/gen_data_golden.py, tests/test_data.c. */
#include "tools/tools.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- torch draws (ATen CPU distributions, torch 1.13) ---- */
/* uniform_real_distribution<float>: (random() & (2^24-1)) * 2^-24, computed in double, exact. */
float ms_torch_rand_float(MsTorchRng *g) {
    return (float)((double)(ms_torch_random(g) & ((1u << 24) - 1)) * (1.0 / 16777216.0));
}

/* random_from_to: range = high - low; a 64-bit draw when range >= 2^32, else random() % range. */
int64_t ms_torch_randint(MsTorchRng *g, int64_t low, int64_t high) {
    uint64_t range = (uint64_t)high - (uint64_t)low;
    if (range >= ((uint64_t)1 << 32)) return (int64_t)(ms_torch_random64(g) % range + (uint64_t)low);
    return (int64_t)((uint64_t)(ms_torch_random(g) % (uint32_t)range) + (uint64_t)low);
}

/* ---- Pillow 9.4 resampling (libImaging/Resample.c, 8 bits per channel) ---- */
#define PIL_PRECISION_BITS (32 - 8 - 2)

static double pil_bilinear_filter(double x) {     /* support 1 */
    if (x < 0.0) x = -x;
    if (x < 1.0) return 1.0 - x;
    return 0.0;
}
static double pil_sinc_filter(double x) {
    if (x == 0.0) return 1.0;
    x = x * MS_PI;
    return sin(x) / x;
}
static double pil_lanczos_filter(double x) {      /* support 3 */
    if (-3.0 <= x && x < 3.0) return pil_sinc_filter(x) * pil_sinc_filter(x / 3);
    return 0.0;
}
static double pil_bicubic_filter(double x) {      /* support 2; Keys' cubic convolution, a = -0.5 */
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}
typedef struct { double (*f)(double); double support; } PilFilter;

/* precompute_coeffs + normalize_coeffs_8bpc for filter flt: output pixel xx uses source pixels
 * bounds[2xx] .. + bounds[2xx+1] with fixed-point weights kk[xx*ksize ..]. Returns ksize, 0
 * when out of memory. */
static int pil_coeffs(const PilFilter *flt, int in_size, int out_size, int **boundsp, int32_t **kkp) {
    double scale, filterscale, support;
    filterscale = scale = (double)in_size / out_size;
    if (filterscale < 1.0) filterscale = 1.0;
    support = flt->support * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *pre = (double *)malloc((size_t)out_size * ksize * sizeof *pre);
    int32_t *kk = (int32_t *)malloc((size_t)out_size * ksize * sizeof *kk);
    int *bounds = (int *)malloc((size_t)out_size * 2 * sizeof *bounds);
    if (!pre || !kk || !bounds) { free(pre); free(kk); free(bounds); return 0; }
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5), xmax, x;
        if (xmin < 0) xmin = 0;
        xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double *k = &pre[(size_t)xx * ksize];
        for (x = 0; x < xmax; x++) {
            double wgt = flt->f((x + xmin - center + 0.5) * ss);
            k[x] = wgt;
            ww += wgt;
        }
        for (x = 0; x < xmax; x++) if (ww != 0.0) k[x] /= ww;
        for (; x < ksize; x++) k[x] = 0;
        bounds[xx * 2] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    for (size_t i = 0; i < (size_t)out_size * ksize; i++)
        kk[i] = pre[i] < 0 ? (int32_t)(-0.5 + pre[i] * (1 << PIL_PRECISION_BITS))
                           : (int32_t)(0.5 + pre[i] * (1 << PIL_PRECISION_BITS));
    free(pre);
    *boundsp = bounds;
    *kkp = kk;
    return ksize;
}

static uint8_t pil_clip8(int32_t v) {
    if (v >= (1 << PIL_PRECISION_BITS << 8)) return 255;
    if (v <= 0) return 0;
    return (uint8_t)(v >> PIL_PRECISION_BITS);
}

/* ImagingResampleInner: horizontal pass over the rows the vertical pass needs, then vertical. */
static MsStatus pil_resample(const PilFilter *flt, uint8_t *out, int ow, int oh, const uint8_t *in, int w, int h, int C) {
    int *bh = NULL, *bv = NULL;
    int32_t *kh = NULL, *kv = NULL;
    int ksh = pil_coeffs(flt, w, ow, &bh, &kh), ksv = pil_coeffs(flt, h, oh, &bv, &kv);
    int y_first = bv ? bv[0] : 0, y_last = bv ? bv[oh * 2 - 2] + bv[oh * 2 - 1] : 0;
    uint8_t *tmp = (uint8_t *)malloc((size_t)ow * (size_t)(y_last - y_first + 1) * C);
    if (!ksh || !ksv || !tmp) {
        free(bh); free(kh); free(bv); free(kv); free(tmp);
        return ms_errorf(MS_ERR_NOMEM, "resize %dx%d -> %dx%d: out of memory", w, h, ow, oh);
    }
    const uint8_t *src = in;
    int src_w = w, row0 = 0;
    if (ow != w) {
        for (int y = y_first; y < y_last; y++)
            for (int xx = 0; xx < ow; xx++) {
                const int32_t *k = &kh[(size_t)xx * ksh];
                int xmin = bh[xx * 2], xmax = bh[xx * 2 + 1];
                for (int c = 0; c < C; c++) {
                    int32_t ss = 1 << (PIL_PRECISION_BITS - 1);
                    for (int x = 0; x < xmax; x++) ss += (int32_t)in[((size_t)y * w + x + xmin) * C + c] * k[x];
                    tmp[((size_t)(y - y_first) * ow + xx) * C + c] = pil_clip8(ss);
                }
            }
        src = tmp; src_w = ow; row0 = y_first;
    }
    if (oh != h) {
        for (int yy = 0; yy < oh; yy++) {
            const int32_t *k = &kv[(size_t)yy * ksv];
            int ymin = bv[yy * 2] - row0, ymax = bv[yy * 2 + 1];
            for (int xx = 0; xx < src_w; xx++)
                for (int c = 0; c < C; c++) {
                    int32_t ss = 1 << (PIL_PRECISION_BITS - 1);
                    for (int y = 0; y < ymax; y++) ss += (int32_t)src[((size_t)(y + ymin) * src_w + xx) * C + c] * k[y];
                    out[((size_t)yy * ow + xx) * C + c] = pil_clip8(ss);
                }
        }
    } else {
        memcpy(out, src, (size_t)ow * oh * C);
    }
    free(bh); free(kh); free(bv); free(kv); free(tmp);
    return MS_OK;
}

/* NEAREST: _imaging.c _resize builds the affine a = [w/ow, 0, 0; 0, h/oh, 0] and
 * ImagingScaleAffine walks it by repeated addition from half a step (COORD truncates, -1 below
 * zero); pixels that map outside stay 0. */
#define PIL_COORD(v) ((v) < 0.0 ? -1 : ((int)(v)))
static MsStatus pil_resize_nearest(uint8_t *out, int ow, int oh, const uint8_t *in, int w, int h, int C) {
    int *xin = (int *)malloc((size_t)ow * sizeof *xin);
    if (!xin) return ms_errorf(MS_ERR_NOMEM, "resize %dx%d -> %dx%d: out of memory", w, h, ow, oh);
    double a0 = (double)w / ow, a4 = (double)h / oh, xo = a0 * 0.5, yo = a4 * 0.5;
    for (int x = 0; x < ow; x++) {
        int xi = PIL_COORD(xo);
        xin[x] = xi >= 0 && xi < w ? xi : -1;
        xo += a0;
    }
    for (int y = 0; y < oh; y++) {
        int yi = PIL_COORD(yo);
        uint8_t *o = out + (size_t)y * ow * C;
        memset(o, 0, (size_t)ow * C);
        if (yi >= 0 && yi < h)
            for (int x = 0; x < ow; x++)
                if (xin[x] >= 0) memcpy(o + (size_t)x * C, in + ((size_t)yi * w + xin[x]) * C, (size_t)C);
        yo += a4;
    }
    free(xin);
    return MS_OK;
}

MsStatus pil_resize(uint8_t *out, int ow, int oh, const uint8_t *in, int w, int h, int C, int resample) {
    if (w <= 0 || h <= 0 || ow <= 0 || oh <= 0 || C < 1 || C > 4 || ow > MS_IMAGE_MAX_DIM || oh > MS_IMAGE_MAX_DIM)
        return ms_errorf(MS_ERR_ARG, "resize %dx%d -> %dx%d, %d channels: bad size", w, h, ow, oh, C);
    if (ow == w && oh == h) { memcpy(out, in, (size_t)w * h * C); return MS_OK; }   /* Image.resize: copy */
    if (resample == PIL_NEAREST) return pil_resize_nearest(out, ow, oh, in, w, h, C);
    if (resample == PIL_BILINEAR) { static const PilFilter f = { pil_bilinear_filter, 1.0 }; return pil_resample(&f, out, ow, oh, in, w, h, C); }
    if (resample == PIL_LANCZOS) { static const PilFilter f = { pil_lanczos_filter, 3.0 }; return pil_resample(&f, out, ow, oh, in, w, h, C); }
    if (resample == PIL_BICUBIC) { static const PilFilter f = { pil_bicubic_filter, 2.0 }; return pil_resample(&f, out, ow, oh, in, w, h, C); }
    return ms_errorf(MS_ERR_ARG, "resize: resample %d is not NEAREST (0), LANCZOS (1), BILINEAR (2) or BICUBIC (3)", resample);
}

/* ---- torchvision 0.14 F.resize output size (functional._compute_resized_output_size) ---- */
MsStatus tv_resize_size(int w, int h, int size, int max_size, int *ow, int *oh) {
    int shrt = w <= h ? w : h, lng = w <= h ? h : w;
    if (size <= 0 || shrt <= 0) return ms_errorf(MS_ERR_ARG, "resize %dx%d to short side %d: bad size", w, h, size);
    /* Python: int(size * long / short): exact integer product, correctly rounded division, trunc */
    int new_short = size, new_long = (int)((double)size * lng / shrt);
    if (max_size > 0) {
        if (max_size <= size)
            return ms_errorf(MS_ERR_ARG, "max_size = %d must be strictly greater than the requested size for the smaller edge size = %d", max_size, size);
        if (new_long > max_size) {
            new_short = (int)((double)max_size * new_short / new_long);
            new_long = max_size;
        }
    }
    *ow = w <= h ? new_short : new_long;
    *oh = w <= h ? new_long : new_short;
    return MS_OK;
}

/* ---- OpenCV 4.6 resize, INTER_LINEAR, CV_64F (imgproc/src/resize.cpp resizeGeneric_ with
 * HResizeLinear<double,double,float> and VResizeLinear): source coordinate
 * f = (float)((d + 0.5) * scale - 0.5), scale = 1 / (dsize / ssize); weights (1 - f, f) kept as
 * float; columns outside the image clamp (weight on the edge pixel), rows clamp their index. */
void cv_resize_linear_f64(double *out, int ow, int oh, const double *in, int w, int h) {
    double scale_x = 1.0 / ((double)ow / w), scale_y = 1.0 / ((double)oh / h);
    for (int dy = 0; dy < oh; dy++) {
        float fy = (float)((dy + 0.5) * scale_y - 0.5);
        int sy = (int)floorf(fy);
        fy -= (float)sy;
        int r0 = sy < 0 ? 0 : sy >= h ? h - 1 : sy, r1 = sy + 1 < 0 ? 0 : sy + 1 >= h ? h - 1 : sy + 1;
        double b0 = (double)(1.f - fy), b1 = (double)fy;
        const double *S0 = in + (size_t)r0 * w, *S1 = in + (size_t)r1 * w;
        int xmax = ow;
        for (int dx = 0; dx < ow; dx++) {
            float fx = (float)((dx + 0.5) * scale_x - 0.5);
            int sx = (int)floorf(fx);
            fx -= (float)sx;
            if (sx < 0) { fx = 0; sx = 0; }
            if (sx + 1 >= w) { if (dx < xmax) xmax = dx; if (sx >= w - 1) { fx = 0; sx = w - 1; } }
            double t0, t1;
            if (dx < xmax) {
                double a0 = (double)(1.f - fx), a1 = (double)fx;
                t0 = S0[sx] * a0 + S0[sx + 1] * a1;
                t1 = S1[sx] * a0 + S1[sx + 1] * a1;
            } else {
                t0 = S0[sx]; t1 = S1[sx];
            }
            out[(size_t)dy * ow + dx] = t0 * b0 + t1 * b1;
        }
    }
}

/* ---- Python str helpers ---- */
/* Length in bytes of the Python whitespace character (str.isspace) at p, 0 if none. */
static size_t py_space_len(const unsigned char *p, const unsigned char *end) {
    if (p >= end) return 0;
    if ((*p >= 0x09 && *p <= 0x0d) || (*p >= 0x1c && *p <= 0x20)) return 1;
    if (end - p >= 2 && p[0] == 0xc2 && (p[1] == 0x85 || p[1] == 0xa0)) return 2;
    if (end - p >= 3) {
        unsigned cp;
        if ((p[0] & 0xf0) != 0xe0) return 0;
        cp = ((unsigned)(p[0] & 0x0f) << 12) | ((unsigned)(p[1] & 0x3f) << 6) | (unsigned)(p[2] & 0x3f);
        if (cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
            cp == 0x202f || cp == 0x205f || cp == 0x3000) return 3;
    }
    return 0;
}
/* Is the whitespace character ending just before end[0] (at most 3 bytes back)? Its length. */
static size_t py_space_len_back(const unsigned char *begin, const unsigned char *end) {
    for (size_t n = 1; n <= 3 && (size_t)(end - begin) >= n; n++) {
        const unsigned char *p = end - n;
        if ((*p & 0xc0) == 0x80) continue;                /* not a lead byte */
        return py_space_len(p, end) == n ? n : 0;
    }
    return 0;
}
/* str.strip(): [*b, *e) of s[0..n) */
static void py_strip(const char *s, size_t n, size_t *b, size_t *e) {
    const unsigned char *p = (const unsigned char *)s, *q = p + n;
    size_t k;
    while ((k = py_space_len(p, q)) > 0) p += k;
    while (q > p && (k = py_space_len_back(p, q)) > 0) q -= k;
    *b = (size_t)(p - (const unsigned char *)s);
    *e = (size_t)(q - (const unsigned char *)s);
}

static char *str_ndup(const char *s, size_t n) {
    char *r = (char *)malloc(n + 1);
    if (!r) return NULL;
    memcpy(r, s, n);
    r[n] = 0;
    return r;
}

/* s.replace(from, to) for every occurrence, left to right, non-overlapping. */
static char *str_replace_all(const char *s, const char *from, const char *to) {
    size_t nf = strlen(from), nt = strlen(to), count = 0, n = strlen(s);
    if (nf == 0) return str_ndup(s, n);          /* replace_mapping keys are never empty */
    for (const char *p = strstr(s, from); p; p = strstr(p + nf, from)) count++;
    if (count && nt > nf && (n + count * (nt - nf)) < n) return NULL;
    char *r = (char *)malloc(n + count * (nt > nf ? nt - nf : 0) + 1), *o = r;
    if (!r) return NULL;
    for (const char *p = s, *q; ; p = q + nf) {
        q = strstr(p, from);
        if (!q) { strcpy(o, p); break; }
        memcpy(o, p, (size_t)(q - p)); o += q - p;
        memcpy(o, to, nt); o += nt;
    }
    return r;
}

char *train_process_text(const char *text, int n_replace, const char (*from)[64], const char (*to)[256]) {
    char *s = str_ndup(text, strlen(text));
    for (int i = 0; s && i < n_replace; i++) {
        char *t = str_replace_all(s, from[i], to[i]);
        free(s);
        s = t;
    }
    if (!s) return NULL;
    size_t b, e, o = 0;
    py_strip(s, strlen(s), &b, &e);
    for (size_t i = b; i < e; i++) {                 /* re.sub(' +', ' ', ...) */
        if (s[i] == ' ' && o > 0 && s[o - 1] == ' ') continue;
        s[o++] = s[i];
    }
    s[o] = 0;
    return s;
}

/* ---- the example ---- */
MsStatus train_sample_init(TrainSample *s, const uint8_t *rgb, int w, int h, const uint8_t *mask,
                           const char *prompt) {
    memset(s, 0, sizeof *s);
    if (w <= 0 || h <= 0 || (size_t)w * (size_t)h > MS_IMAGE_MAX_PIXELS)
        return ms_errorf(MS_ERR_ARG, "train sample: bad image size %dx%d", w, h);
    size_t n = (size_t)w * h;
    s->w = w; s->h = h;
    s->rgb = (uint8_t *)malloc(n * 3);
    s->prompt = str_ndup(prompt ? prompt : "", prompt ? strlen(prompt) : 0);
    if (mask) { s->has_mask = 1; s->mask_l = (uint8_t *)malloc(n); }
    if (!s->rgb || !s->prompt || (mask && !s->mask_l)) { train_sample_free(s); return ms_errorf(MS_ERR_NOMEM, "train sample: out of memory"); }
    memcpy(s->rgb, rgb, n * 3);
    if (mask) memcpy(s->mask_l, mask, n);
    return MS_OK;
}

void train_sample_free(TrainSample *s) {
    free(s->rgb); free(s->tensor); free(s->mask_l); free(s->mask); free(s->img_mask); free(s->prompt);
    memset(s, 0, sizeof *s);
}

/* Replaces *img (w,h,C) by its Pillow resize to (ow, oh). */
static MsStatus resize_owned(uint8_t **img, int w, int h, int C, int ow, int oh, int resample) {
    if (ow == w && oh == h) return MS_OK;
    if (ow <= 0 || oh <= 0)
        return ms_errorf(MS_ERR_ARG, "resize %dx%d -> %dx%d: empty image (Pillow refuses it)", w, h, ow, oh);
    uint8_t *o = (uint8_t *)malloc((size_t)ow * oh * C);
    if (!o) return ms_errorf(MS_ERR_NOMEM, "resize %dx%d -> %dx%d: out of memory", w, h, ow, oh);
    MsStatus st = pil_resize(o, ow, oh, *img, w, h, C, resample);
    if (st != MS_OK) { free(o); return st; }
    free(*img);
    *img = o;
    return MS_OK;
}

/* Image.crop((left, top, left + cw, top + ch)): zero where the box leaves the image. */
static MsStatus crop_owned(uint8_t **img, int w, int h, int C, int top, int left, int ch, int cw) {
    uint8_t *o = (uint8_t *)calloc((size_t)cw * ch * C + 1, 1);
    if (!o) return ms_errorf(MS_ERR_NOMEM, "crop: out of memory");
    for (int y = 0; y < ch; y++) {
        int sy = top + y;
        if (sy < 0 || sy >= h) continue;
        for (int x = 0; x < cw; x++) {
            int sx = left + x;
            if (sx >= 0 && sx < w) memcpy(o + ((size_t)y * cw + x) * C, *img + ((size_t)sy * w + sx) * C, (size_t)C);
        }
    }
    free(*img);
    *img = o;
    return MS_OK;
}

static MsStatus sample_resize(TrainSample *s, int ow, int oh, int mask_resample) {
    MsStatus st = resize_owned(&s->rgb, s->w, s->h, 3, ow, oh, PIL_BILINEAR);
    if (st == MS_OK && s->mask_l) st = resize_owned(&s->mask_l, s->w, s->h, 1, ow, oh, mask_resample);
    if (st == MS_OK) { s->w = ow; s->h = oh; }
    return st;
}

static MsStatus sample_crop(TrainSample *s, int top, int left, int ch, int cw) {
    MsStatus st = crop_owned(&s->rgb, s->w, s->h, 3, top, left, ch, cw);
    if (st == MS_OK && s->mask_l) st = crop_owned(&s->mask_l, s->w, s->h, 1, top, left, ch, cw);
    if (st == MS_OK) { s->w = cw; s->h = ch; }
    return st;
}

/* Random crop to S x S of an image whose short side is S (step 2 of both resize transforms):
 * with a mask PairRandomCrop (x = random.randint(0, w - S), then y), without torchvision's
 * RandomCrop (no draw when the size already fits, else torch.randint for top, then left). */
static MsStatus random_crop(TrainSample *s, int S, PyRandom *py, MsTorchRng *g, const char *who) {
    int top, left;
    if (s->w < S || s->h < S)
        return ms_errorf(MS_ERR_ARG, "%s: crop %dx%d from %dx%d (the official code fails)", who, S, S, s->w, s->h);
    if (s->mask_l) {
        left = (int)py_random_randint(py, 0, s->w - S);
        top = (int)py_random_randint(py, 0, s->h - S);
    } else if (s->w == S && s->h == S) {
        top = left = 0;
    } else {
        top = (int)ms_torch_randint(g, 0, (int64_t)s->h - S + 1);
        left = (int)ms_torch_randint(g, 0, (int64_t)s->w - S + 1);
    }
    return sample_crop(s, top, left, S, S);
}

/* Step 4 of both resize transforms: paste the image at a random place of an S x S zero canvas
 * (start_y = random.randint(0, 512 - h), then start_x: the official code hard-codes 512; the
 * mixshow *Place types draw randint(0, S - h), the same draws for S = 512), the mask /255 in
 * float64 likewise, img_mask = 1 where the image is; then cv2.resize of both masks to
 * (S/8, S/8), INTER_LINEAR (see the file header). */
static MsStatus place_on_canvas(TrainSample *s, int S, int place, PyRandom *py, const char *who) {
    int nw = s->w, nh = s->h, sy, sx, B = place ? S : 512;
    if (nh > B || nw > B)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s(size=%d): image of %dx%d: random.randint(0, %d - %d) raises%s", who, S,
                         nw, nh, B, nh > B ? nh : nw, place ? "" : " (the official code hard-codes 512)");
    sy = (int)py_random_randint(py, 0, B - nh);
    sx = (int)py_random_randint(py, 0, B - nw);
    if (sy + nh > S || sx + nw > S)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s(size=%d): the official code places the %dx%d image at (%d, %d) "
                         "(randint up to 512 - size, hard-coded), outside its %dx%d canvas: numpy fails to "
                         "broadcast there; use size 512", who, S, nw, nh, sx, sy, S, S);
    size_t n = (size_t)S * S;
    int m8 = S / 8;
    uint8_t *canvas = (uint8_t *)calloc(n * 3, 1);
    double *full = (double *)calloc(n, sizeof *full);
    double *mask = s->mask_l ? (double *)malloc((size_t)m8 * m8 * sizeof *mask) : NULL;
    double *img_mask = (double *)malloc((size_t)m8 * m8 * sizeof *img_mask + 1);
    if (!canvas || !full || !img_mask || (s->mask_l && !mask)) {
        free(canvas); free(full); free(mask); free(img_mask);
        return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", who);
    }
    for (int y = 0; y < nh; y++) memcpy(canvas + ((size_t)(sy + y) * S + sx) * 3, s->rgb + (size_t)y * nw * 3, (size_t)nw * 3);
    if (s->mask_l) {
        for (int y = 0; y < nh; y++)
            for (int x = 0; x < nw; x++) full[(size_t)(sy + y) * S + sx + x] = (double)s->mask_l[(size_t)y * nw + x] / 255.0;
        cv_resize_linear_f64(mask, m8, m8, full, S, S);
        memset(full, 0, n * sizeof *full);
    }
    for (int y = 0; y < nh; y++)
        for (int x = 0; x < nw; x++) full[(size_t)(sy + y) * S + sx + x] = 1.0;
    cv_resize_linear_f64(img_mask, m8, m8, full, S, S);
    free(full);
    free(s->rgb); s->rgb = canvas;
    free(s->mask_l); s->mask_l = NULL;
    free(s->mask); s->mask = mask;
    free(s->img_mask); s->img_mask = img_mask;
    s->w = s->h = S; s->mw = s->mh = m8;
    s->placed = 1;
    return MS_OK;
}

static MsStatus check_resize_input(const TrainSample *s, const MsTransformSpec *t, const char *who) {
    if (!s->rgb || s->placed)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: needs a PIL image before ToTensor and before another "
                         "resize transform (the official code fails otherwise)", who);
    if (t->size < 8 || (!t->place && t->size > 512))
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: size %d: the official code works for 8 <= size <= 512 only "
                         "(it places on a 512 canvas; the mixshow *Place types place on the size's own)", who, t->size);
    return MS_OK;
}

/* HumanResizeCropFinalV3(size, crop_p). */
static MsStatus human_resize_crop_v3(const MsTransformSpec *t, TrainSample *s, PyRandom *py, MsTorchRng *g) {
    static const char who[] = "HumanResizeCropFinalV3";
    int S = t->size, ow, oh;
    MsStatus st = check_resize_input(s, t, who);
    if (st == MS_OK) st = tv_resize_size(s->w, s->h, S, 0, &ow, &oh);         /* step 1 */
    if (st == MS_OK) st = sample_resize(s, ow, oh, PIL_BILINEAR);
    if (st != MS_OK) return st;
    if (py_random_random(py) < t->crop_p) {                                    /* step 2 */
        if (s->h > s->w) {
            int crop_pos = (int)py_random_randint(py, 0, s->h - s->w);
            st = sample_crop(s, 0, 0, s->w + crop_pos, s->w);
        } else {
            st = random_crop(s, S, py, g, who);
        }
        if (st != MS_OK) return st;
    }
    st = tv_resize_size(s->w, s->h, S - 1, S, &ow, &oh);                       /* step 3 */
    if (st == MS_OK) st = sample_resize(s, ow, oh, PIL_BILINEAR);
    if (st == MS_OK) st = place_on_canvas(s, S, t->place, py, who);              /* step 4 */
    return st;
}

/* ResizeFillMaskNew(size, crop_p, scale_ratio). */
static MsStatus resize_fill_mask_new(const MsTransformSpec *t, TrainSample *s, PyRandom *py, MsTorchRng *g) {
    static const char who[] = "ResizeFillMaskNew";
    int S = t->size, ow, oh;
    MsStatus st = check_resize_input(s, t, who);
    if (st == MS_OK) st = tv_resize_size(s->w, s->h, S, 0, &ow, &oh);         /* step 1 */
    if (st == MS_OK) st = sample_resize(s, ow, oh, PIL_BILINEAR);
    if (st != MS_OK) return st;
    if (py_random_random(py) < t->crop_p) {                                    /* step 2 */
        st = random_crop(s, S, py, g, who);
    } else {
        st = tv_resize_size(s->w, s->h, S - 1, S, &ow, &oh);
        if (st == MS_OK) st = sample_resize(s, ow, oh, PIL_BILINEAR);
    }
    if (st != MS_OK) return st;
    double ratio = py_random_uniform(py, t->scale_ratio[0], t->scale_ratio[1]);  /* step 3 */
    double fh = s->h * ratio, fw = s->w * ratio;
    if (!(fh >= 1.0 && fw >= 1.0 && fh < 1e6 && fw < 1e6))
        return ms_errorf(MS_ERR_ARG, "%s: scale ratio %.17g makes a %gx%g image", who, ratio, fw, fh);
    st = sample_resize(s, (int)fw, (int)fh, PIL_NEAREST);       /* F.resize(mask, ..., interpolation=0) */
    if (st == MS_OK) st = place_on_canvas(s, S, t->place, py, who);       /* step 4 */
    return st;
}

/* F.to_tensor: (h,w,3) bytes -> (3,h,w) float32, x / 255 in float. */
static MsStatus to_tensor(TrainSample *s) {
    if (!s->rgb) return ms_errorf(MS_ERR_UNSUPPORTED, "ToTensor: the image already is a tensor");
    size_t n = (size_t)s->w * s->h;
    float *t = (float *)malloc(n * 3 * sizeof *t);
    if (!t) return ms_errorf(MS_ERR_NOMEM, "ToTensor: out of memory");
    for (int c = 0; c < 3; c++)
        for (size_t i = 0; i < n; i++) t[c * n + i] = (float)s->rgb[i * 3 + c] / 255.0f;
    free(s->rgb); s->rgb = NULL;
    s->tensor = t;
    return MS_OK;
}

/* F.normalize: tensor.sub_(mean).div_(std), mean/std as float32, length 1 broadcast. */
static MsStatus normalize(const MsTransformSpec *t, TrainSample *s) {
    if (!s->tensor) return ms_errorf(MS_ERR_UNSUPPORTED, "Normalize: needs a tensor (put ToTensor first; the official code fails)");
    if (t->n_mean != 1 && t->n_mean != 3) return ms_errorf(MS_ERR_ARG, "Normalize: mean/std of length %d (1 or 3)", t->n_mean);
    size_t n = (size_t)s->w * s->h;
    for (int c = 0; c < 3; c++) {
        int k = t->n_mean == 1 ? 0 : c;
        float m = (float)t->mean[k], sd = (float)t->std[k];
        if (sd == 0.0f) return ms_errorf(MS_ERR_ARG, "Normalize: std evaluated to zero, leading to division by zero");
        for (size_t i = 0; i < n; i++) s->tensor[c * n + i] = (s->tensor[c * n + i] - m) / sd;
    }
    return MS_OK;
}

/* PairRandomHorizontalFlip: torch.rand(1) < p flips the image and kwargs['mask'] (not
 * img_mask). Without a mask the official code fails (KeyError 'mask'): an error here too. */
static MsStatus pair_hflip(const MsTransformSpec *t, TrainSample *s, MsTorchRng *g) {
    if (!s->has_mask)
        return ms_errorf(MS_ERR_UNSUPPORTED, "PairRandomHorizontalFlip: needs a mask (use_mask: true); the official code fails with KeyError 'mask'");
    float u = ms_torch_rand_float(g);
    if (!(u < (float)t->p)) return MS_OK;                 /* float tensor < python float: float32 compare */
    int w = s->w, h = s->h;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w / 2; x++) {
            int xr = w - 1 - x;
            if (s->rgb) {
                uint8_t *a = s->rgb + ((size_t)y * w + x) * 3, *b = s->rgb + ((size_t)y * w + xr) * 3, tmp[3];
                memcpy(tmp, a, 3); memcpy(a, b, 3); memcpy(b, tmp, 3);
            } else {
                size_t n = (size_t)w * h;
                for (int c = 0; c < 3; c++) {
                    float v = s->tensor[c * n + (size_t)y * w + x];
                    s->tensor[c * n + (size_t)y * w + x] = s->tensor[c * n + (size_t)y * w + xr];
                    s->tensor[c * n + (size_t)y * w + xr] = v;
                }
            }
            if (s->mask_l) {
                uint8_t v = s->mask_l[(size_t)y * w + x];
                s->mask_l[(size_t)y * w + x] = s->mask_l[(size_t)y * w + xr];
                s->mask_l[(size_t)y * w + xr] = v;
            }
        }
    if (s->placed && s->mask)
        for (int y = 0; y < s->mh; y++)
            for (int x = 0; x < s->mw / 2; x++) {
                double *row = s->mask + (size_t)y * s->mw, v = row[x];
                row[x] = row[s->mw - 1 - x];
                row[s->mw - 1 - x] = v;
            }
    return MS_OK;
}

/* ShuffleCaption(keep_token_num): strip, split on ',', strip each, shuffle all but the first
 * keep_token_num, join with ', '. */
static MsStatus shuffle_caption(const MsTransformSpec *t, TrainSample *s, PyRandom *py) {
    size_t b, e, n = 1, cap = 0;
    py_strip(s->prompt, strlen(s->prompt), &b, &e);
    for (size_t i = b; i < e; i++) n += s->prompt[i] == ',';
    size_t *tb = (size_t *)malloc(n * 2 * sizeof *tb);
    char *out = (char *)malloc((e - b) + 2 * n + 1);
    if (!tb || !out) { free(tb); free(out); return ms_errorf(MS_ERR_NOMEM, "ShuffleCaption: out of memory"); }
    for (size_t i = b, k = 0, start = b; i <= e; i++)
        if (i == e || s->prompt[i] == ',') {
            size_t tb0, te0;
            py_strip(s->prompt + start, i - start, &tb0, &te0);
            tb[2 * k] = start + tb0; tb[2 * k + 1] = start + te0;
            k++; start = i + 1;
        }
    size_t keep = t->keep_token_num > 0 ? (size_t)t->keep_token_num : 0;
    if (keep > n) keep = n;
    py_random_shuffle(py, tb + 2 * keep, n - keep, 2 * sizeof *tb);
    for (size_t k = 0; k < n; k++) {
        if (k) { out[cap++] = ','; out[cap++] = ' '; }
        memcpy(out + cap, s->prompt + tb[2 * k], tb[2 * k + 1] - tb[2 * k]);
        cap += tb[2 * k + 1] - tb[2 * k];
    }
    out[cap] = 0;
    free(tb);
    free(s->prompt);
    s->prompt = out;
    return MS_OK;
}

/* EnhanceText templates, verbatim from pil_transform.py (order matters: random.choice). */
static const char *const STYLE_TEMPLATE[] = {
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}", "a rendition in the style of {}",
    "a nice painting in the style of {}", "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
};
static const char *const OBJECT_TEMPLATE[] = {
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
};
static const char *const HUMAN_TEMPLATE[] = {
    "a photo of a {}", "a photo of one {}", "a photo of the {}",
    "the photo of a {}", "a rendering of a {}",
    "a rendition of the {}", "a rendition of a {}",
    "a cropped photo of the {}", "a cropped photo of a {}",
    "a bad photo of the {}", "a bad photo of a {}",
    "a photo of a weird {}", "a weird photo of a {}",
    "a bright photo of the {}", "a good photo of the {}",
    "a photo of a nice {}", "a good photo of a {}",
    "a photo of a cool {}", "a bright photo of the {}",
};

static MsStatus enhance_text(const MsTransformSpec *t, TrainSample *s, PyRandom *py) {
    const char *const *tpl;
    size_t n;
    const char *type = t->enhance_type[0] ? t->enhance_type : "object";
    if (!strcmp(type, "object")) { tpl = OBJECT_TEMPLATE; n = sizeof OBJECT_TEMPLATE / sizeof *OBJECT_TEMPLATE; }
    else if (!strcmp(type, "style")) { tpl = STYLE_TEMPLATE; n = sizeof STYLE_TEMPLATE / sizeof *STYLE_TEMPLATE; }
    else if (!strcmp(type, "human")) { tpl = HUMAN_TEMPLATE; n = sizeof HUMAN_TEMPLATE / sizeof *HUMAN_TEMPLATE; }
    else return ms_errorf(MS_ERR_ARG, "EnhanceText: enhance_type '%s' (expected object, human or style)", type);
    size_t b, e;
    py_strip(s->prompt, strlen(s->prompt), &b, &e);
    const char *tp = tpl[py_random_choice(py, n)], *hole = strstr(tp, "{}");
    size_t len = strlen(tp) - 2 + (e - b);
    char *out = (char *)malloc(len + 1);
    if (!out) return ms_errorf(MS_ERR_NOMEM, "EnhanceText: out of memory");
    memcpy(out, tp, (size_t)(hole - tp));
    memcpy(out + (hole - tp), s->prompt + b, e - b);
    strcpy(out + (hole - tp) + (e - b), hole + 2);
    free(s->prompt);
    s->prompt = out;
    return MS_OK;
}

MsStatus train_transform_apply(const MsTransformSpec *t, TrainSample *s, PyRandom *py, MsTorchRng *g) {
    switch (t->type) {
    case MS_TF_HUMAN_RESIZE_CROP_V3: return human_resize_crop_v3(t, s, py, g);
    case MS_TF_RESIZE_FILL_MASK_NEW: return resize_fill_mask_new(t, s, py, g);
    case MS_TF_TO_TENSOR: return to_tensor(s);
    case MS_TF_NORMALIZE: return normalize(t, s);
    case MS_TF_SHUFFLE_CAPTION: return shuffle_caption(t, s, py);
    case MS_TF_ENHANCE_TEXT: return enhance_text(t, s, py);
    case MS_TF_PAIR_RANDOM_HFLIP: return pair_hflip(t, s, g);
    }
    return ms_errorf(MS_ERR_ARG, "instance_transform: unknown transform type %d", (int)t->type);
}

MsStatus train_transforms_run(const MsTransformSpec *t, int n, TrainSample *s, PyRandom *py, MsTorchRng *g) {
    for (int i = 0; i < n; i++) {
        MsStatus st = train_transform_apply(&t[i], s, py, g);
        if (st != MS_OK) return st;
    }
    return MS_OK;
}
