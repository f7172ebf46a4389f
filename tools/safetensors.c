/* tools/safetensors.c — read and write safetensors files (huggingface/safetensors 0.3/0.4).
 *
 * Layout: u64 little-endian header length N, N bytes of JSON header, then the data section.
 * The reader accepts exactly what the reference Rust reader accepts (header <= 100 MB, tensors
 * tiling the data section without holes or overlaps, e - b == numel * dtype size, the last
 * tensor ending at the end of the file) and checks every size from the file for overflow.
 * The writer reproduces the reference writer byte for byte: tensors sorted by decreasing
 * dtype alignment then by name, __metadata__ first, compact JSON padded with spaces to a
 * multiple of 8 bytes (tests/test_io.c compares with tools/ref/common.py's writer).
 * Values are little-endian in the file: bytes are assembled, so big-endian hosts work.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L          /* open, fstat, mmap: in the guarded section below */
#endif
#if !defined(_WIN32) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE                  /* glibc: madvise(MADV_DONTNEED), see st_release */
#endif
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__unix__) || defined(__APPLE__)) && !defined(MS_NO_MMAP)
#define ST_MMAP 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#endif

static const char *const dtype_names[ST_NDTYPES] = {
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"
};
static const unsigned char dtype_sizes[ST_NDTYPES] = { 1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8 };

const char *st_dtype_name(StDtype d) { return (unsigned)d < ST_NDTYPES ? dtype_names[d] : "?"; }
size_t st_dtype_size(StDtype d) { return (unsigned)d < ST_NDTYPES ? dtype_sizes[d] : 0; }

static int host_is_le(void) { uint16_t one = 1; unsigned char c; memcpy(&c, &one, 1); return c == 1; }

static uint64_t load_le(const unsigned char *p, size_t n) {      /* n-byte little-endian integer */
    uint64_t v = 0;
    for (size_t i = n; i-- > 0; ) v = v << 8 | p[i];
    return v;
}

static void store_le(unsigned char *p, uint64_t v, size_t n) {
    for (size_t i = 0; i < n; i++) { p[i] = (unsigned char)(v & 0xff); v >>= 8; }
}

/* ---------------------------------------------------------------------------------------- */
/* Half and bfloat16                                                                         */
/* ---------------------------------------------------------------------------------------- */
static float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

/* IEEE binary16/bfloat16 -> binary32. Widening is exact; the one definition is in
 * models/weights.c (the networks use it too). */
float st_f16_to_f32(uint16_t h) { return ms_f16_to_f32(h); }
float st_bf16_to_f32(uint16_t h) { return ms_bf16_to_f32(h); }

/* binary32 -> binary16, round to nearest, ties to even. */
uint16_t st_f32_to_f16(float x) {
    uint32_t u = f32_bits(x), a = u & 0x7fffffff;
    uint16_t sign = (uint16_t)(u >> 16 & 0x8000);
    if (a > 0x7f800000) return (uint16_t)(sign | 0x7e00 | (a >> 13 & 0x3ff));   /* NaN stays (quiet) NaN */
    if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00);   /* >= 65520 = 65504 + half an ulp: tie goes to inf (odd) */
    if (a >= 0x38800000) {                                   /* normal half: >= 2^-14 */
        a += 0xc8000000u + 0xfff + (a >> 13 & 1);            /* exponent -112, then round the 13 dropped bits */
        return (uint16_t)(sign | a >> 13);
    }
    uint32_t e = a >> 23;                                    /* subnormal half: units of 2^-24 */
    if (e < 102) return sign;                                /* < 2^-25: rounds to zero */
    uint32_t m = (a & 0x7fffff) | 0x800000, shift = 126 - e; /* value = m * 2^(e-150) = (m >> shift) units */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;         /* q == 0x400 is the smallest normal: right */
    return (uint16_t)(sign | q);
}

/* binary32 -> bfloat16 (the top 16 bits), round to nearest, ties to even. */
uint16_t st_f32_to_bf16(float x) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)(u >> 16 | 0x40);   /* NaN: keep sign, make quiet */
    return (uint16_t)((u + 0x7fff + (u >> 16 & 1)) >> 16);
}

/* ---------------------------------------------------------------------------------------- */
/* Reading                                                                                   */
/* ---------------------------------------------------------------------------------------- */
static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = (char *)malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

void st_close(StFile *f) {
    if (!f) return;
    for (size_t i = 0; i < f->count; i++) free(f->tensors[i].name);
    for (size_t i = 0; i < f->meta_count; i++) { free(f->meta_keys[i]); free(f->meta_vals[i]); }
    free(f->tensors); free(f->by_name); free(f->meta_keys); free(f->meta_vals); free(f->origin);
#ifdef ST_MMAP
    if (f->own == 2 && f->buf) munmap(f->buf, f->size);
#endif
    if (f->own == 1) free(f->buf);
    memset(f, 0, sizeof *f);
}

static int cmp_offset(const void *a, const void *b) {   /* by (begin, end) */
    const StTensor *x = (const StTensor *)a, *y = (const StTensor *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(const StTensor *const *)a)->name, (*(const StTensor *const *)b)->name);
}

static MsStatus parse_meta(StFile *f, const JsonValue *m) {
    if (m->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: __metadata__ must be an object of strings, found %s", f->origin, json_type_name(m->type));
    f->meta_keys = (char **)calloc(m->count ? m->count : 1, sizeof(char *));
    f->meta_vals = (char **)calloc(m->count ? m->count : 1, sizeof(char *));
    if (!f->meta_keys || !f->meta_vals) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", f->origin);
    for (size_t i = 0; i < m->count; i++) {
        const JsonValue *v = &m->items[i];
        if (v->type != JSON_STRING)
            return ms_errorf(MS_ERR_FORMAT, "%s: __metadata__ '%.200s': expected a string, found %s", f->origin, v->key, json_type_name(v->type));
        f->meta_keys[i] = dup_str(v->key);
        f->meta_vals[i] = dup_str(v->str);
        f->meta_count = i + 1;
        if (!f->meta_keys[i] || !f->meta_vals[i]) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", f->origin);
    }
    return MS_OK;
}

/* One header entry -> t (t->data is set once all offsets are checked). */
static MsStatus parse_entry(StFile *f, const JsonValue *e, StTensor *t, size_t *end_out) {
    const char *nm = e->key;
    const JsonValue *dt, *shape, *offs;
    MsStatus s;
    if (strlen(nm) != e->key_len) return ms_errorf(MS_ERR_FORMAT, "%s: tensor name '%s' contains a NUL byte", f->origin, nm);
    if (e->type != JSON_OBJECT)
        return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': expected an object, found %s", f->origin, nm, json_type_name(e->type));
    if ((s = json_need(e, "dtype", JSON_STRING, &dt)) != MS_OK || (s = json_need(e, "shape", JSON_ARRAY, &shape)) != MS_OK ||
        (s = json_need(e, "data_offsets", JSON_ARRAY, &offs)) != MS_OK) return s;
    t->dtype = ST_NDTYPES;
    for (int d = 0; d < ST_NDTYPES; d++) if (!strcmp(dt->str, dtype_names[d])) t->dtype = (StDtype)d;
    if (t->dtype == ST_NDTYPES)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: tensor '%.200s': unknown dtype '%.40s'", f->origin, nm, dt->str);
    if (shape->count > MS_MAX_DIMS)
        return ms_errorf(MS_ERR_UNSUPPORTED, "%s: tensor '%.200s': %zu dimensions, at most %d supported", f->origin, nm, shape->count, MS_MAX_DIMS);
    t->ndim = (int)shape->count;
    t->numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        int64_t d;
        if ((s = json_as_int(&shape->items[i], "shape", &d)) != MS_OK) return s;
        if (d < 0) return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': negative dimension %lld", f->origin, nm, (long long)d);
        if ((uint64_t)d > SIZE_MAX || !ms_mul_ok(t->numel, (size_t)d, &t->numel))
            return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': shape overflows size_t", f->origin, nm);
        t->shape[i] = d;
    }
    if (!ms_mul_ok(t->numel, dtype_sizes[t->dtype], &t->nbytes))
        return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': byte size overflows size_t", f->origin, nm);
    int64_t b, e2;
    if (offs->count != 2) return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': data_offsets needs 2 numbers, found %zu", f->origin, nm, offs->count);
    if ((s = json_as_int(&offs->items[0], "data_offsets", &b)) != MS_OK || (s = json_as_int(&offs->items[1], "data_offsets", &e2)) != MS_OK) return s;
    if (b < 0 || e2 < b || (uint64_t)e2 > SIZE_MAX)
        return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': bad data_offsets [%lld, %lld]", f->origin, nm, (long long)b, (long long)e2);
    if ((size_t)(e2 - b) != t->nbytes)
        return ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': data_offsets [%lld, %lld] hold %lld bytes, dtype %s x %zu elements needs %zu",
                         f->origin, nm, (long long)b, (long long)e2, (long long)(e2 - b), dtype_names[t->dtype], t->numel, t->nbytes);
    t->offset = (size_t)b;
    *end_out = (size_t)e2;
    if (!(t->name = dup_str(nm))) return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", f->origin);
    return MS_OK;
}

/* f->buf/size/origin set: parses and checks the header, points every tensor into buf. */
static MsStatus st_parse(StFile *f) {
    JsonValue *root = NULL;
    MsStatus s = MS_OK;
    if (f->size < 8) return ms_errorf(MS_ERR_FORMAT, "%s: %zu bytes, too short for the 8-byte header length", f->origin, f->size);
    uint64_t n = load_le(f->buf, 8);
    if (n > ST_MAX_HEADER)
        return ms_errorf(MS_ERR_FORMAT, "%s: header length %llu exceeds the %zu-byte limit", f->origin, (unsigned long long)n, ST_MAX_HEADER);
    if (n > f->size - 8)
        return ms_errorf(MS_ERR_FORMAT, "%s: header length %llu but only %zu bytes follow", f->origin, (unsigned long long)n, f->size - 8);
    size_t data_len = f->size - 8 - (size_t)n;
    const unsigned char *data = f->buf + 8 + n;
    if ((s = json_parse((const char *)f->buf + 8, (size_t)n, f->origin, &root)) != MS_OK) return s;
    if (root->type != JSON_OBJECT) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: header must be a JSON object, found %s", f->origin, json_type_name(root->type));
        goto done;
    }
    f->tensors = (StTensor *)calloc(root->count ? root->count : 1, sizeof *f->tensors);
    f->by_name = (StTensor **)calloc(root->count ? root->count : 1, sizeof *f->by_name);
    if (!f->tensors || !f->by_name) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", f->origin); goto done; }
    for (size_t i = 0; i < root->count && s == MS_OK; i++) {
        const JsonValue *e = &root->items[i];
        size_t end;
        if (!strcmp(e->key, "__metadata__") && e->key_len == 12) { s = parse_meta(f, e); continue; }
        s = parse_entry(f, e, &f->tensors[f->count], &end);
        if (s == MS_OK) f->count++;
        else free(f->tensors[f->count].name);
    }
    if (s != MS_OK) goto done;
    /* tile the data section exactly, like the reference reader (Metadata::validate) */
    qsort(f->tensors, f->count, sizeof *f->tensors, cmp_offset);
    size_t at = 0;
    for (size_t i = 0; i < f->count; i++) {
        StTensor *t = &f->tensors[i];
        size_t b = t->offset;
        if (b != at) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s' begins at data offset %zu, expected %zu (tensors must tile the data section)",
                          f->origin, t->name, b, at);
            goto done;
        }
        if (t->nbytes > data_len - at) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: tensor '%.200s': data [%zu, %zu) runs past the end of the file (data section %zu bytes)",
                          f->origin, t->name, b, b + t->nbytes, data_len);
            goto done;
        }
        t->data = data + b;
        at = b + t->nbytes;
    }
    if (at != data_len) {
        s = ms_errorf(MS_ERR_FORMAT, "%s: tensors cover %zu bytes of a %zu-byte data section", f->origin, at, data_len);
        goto done;
    }
    for (size_t i = 0; i < f->count; i++) f->by_name[i] = &f->tensors[i];
    qsort(f->by_name, f->count, sizeof *f->by_name, cmp_name);
done:
    json_free(root);
    return s;
}

MsStatus st_open_memory(StFile *f, const void *data, size_t size, const char *origin) {
    memset(f, 0, sizeof *f);
    f->buf = (unsigned char *)(uintptr_t)data;
    f->size = size;
    if (!(f->origin = dup_str(origin ? origin : "<memory>"))) return ms_errorf(MS_ERR_NOMEM, "out of memory");
    MsStatus s = st_parse(f);
    if (s != MS_OK) st_close(f);
    return s;
}

/* Whole file into malloc'd memory, growing geometrically (no ftell: long is 32-bit on Windows). */
static MsStatus read_all(StFile *f, const char *path) {
    FILE *fp = fopen(path, "rb");
    size_t cap = 1 << 20, n;
    if (!fp) return ms_errorf(MS_ERR_IO, "%s: cannot open for reading", path);
    f->own = 1;
    for (;;) {
        if (f->size == cap || !f->buf) {
            if (f->buf) { if (cap > SIZE_MAX / 2) { fclose(fp); return ms_errorf(MS_ERR_NOMEM, "%s: too large", path); } cap *= 2; }
            unsigned char *b = (unsigned char *)realloc(f->buf, cap);
            if (!b) { fclose(fp); return ms_errorf(MS_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, cap); }
            f->buf = b;
        }
        n = fread(f->buf + f->size, 1, cap - f->size, fp);
        f->size += n;
        if (n == 0) break;
    }
    int err = ferror(fp);
    fclose(fp);
    return err ? ms_errorf(MS_ERR_IO, "%s: read error after %zu bytes", path, f->size) : MS_OK;
}

MsStatus st_open(StFile *f, const char *path) {
    MsStatus s = MS_OK;
    memset(f, 0, sizeof *f);
    if (!(f->origin = dup_str(path))) return ms_errorf(MS_ERR_NOMEM, "out of memory");
#ifdef ST_MMAP
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0) s = ms_errorf(MS_ERR_IO, "%s: cannot open for reading", path);
    else if (fstat(fd, &st) != 0 || st.st_size < 0) s = ms_errorf(MS_ERR_IO, "%s: cannot stat", path);
    else if ((off_t)(size_t)st.st_size != st.st_size) s = ms_errorf(MS_ERR_NOMEM, "%s: too large to map", path);
    else if ((size_t)st.st_size >= 8) {                 /* shorter files fail in st_parse */
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) s = ms_errorf(MS_ERR_IO, "%s: mmap failed", path);
        else { f->buf = (unsigned char *)p; f->size = (size_t)st.st_size; f->own = 2; }
    }
    if (fd >= 0) close(fd);
    if (s == MS_OK && !f->buf) s = read_all(f, path);
#else
    s = read_all(f, path);
#endif
    if (s == MS_OK) s = st_parse(f);
    if (s != MS_OK) st_close(f);
    return s;
}

/* Loading copies every tensor once (into f32 or 16-bit tables); the mapped file pages it came
 * from would otherwise stay resident until st_close, doubling the peak memory of a model
 * load. Dropping the whole pages inside the tensor's bytes returns them to the OS (they are
 * re-read from the file if touched again). A no-op for files read into memory. */
void st_release(const StFile *f, const StTensor *t) {
#if defined(ST_MMAP) && defined(MADV_DONTNEED)
    if (f->own != 2 || !t->nbytes) return;
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0) return;
    uintptr_t a = (uintptr_t)t->data, e = a + t->nbytes, page = (uintptr_t)pg;
    a = (a + page - 1) / page * page;
    e = e / page * page;
    if (e > a) madvise((void *)a, (size_t)(e - a), MADV_DONTNEED);
#else
    (void)f; (void)t;
#endif
}

const StTensor *st_find(const StFile *f, const char *name) {
    size_t lo = 0, hi = f->count;
    while (lo < hi) {                                     /* binary search over by_name */
        size_t mid = lo + (hi - lo) / 2;
        const StTensor *t = f->by_name[mid];
        int c = strcmp(t->name, name);
        if (!c) return t;
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

const char *st_meta(const StFile *f, const char *key) {
    for (size_t i = 0; i < f->meta_count; i++) if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
    return NULL;
}

static void shape_str(char *buf, size_t size, int ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && n < size; i++) n += (size_t)snprintf(buf + n, size - n, i ? ",%lld" : "%lld", (long long)shape[i]);
    if (n < size) snprintf(buf + n, size - n, ")");
}

MsStatus st_check_shape(const StFile *f, const StTensor *t, int ndim, const int64_t *shape) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (ok) return MS_OK;
    char got[160], want[160];
    shape_str(got, sizeof got, t->ndim, t->shape);
    shape_str(want, sizeof want, ndim, shape);
    return ms_errorf(MS_ERR_SHAPE, "%s: '%.200s' has shape %s, expected %s", f->origin, t->name, got, want);
}

MsStatus st_to_f32(const StFile *f, const StTensor *t, float *out, size_t n) {
    const unsigned char *p = t->data;
    size_t sz = dtype_sizes[t->dtype];
    if (n != t->numel)
        return ms_errorf(MS_ERR_SHAPE, "%s: '%.200s' has %zu elements, caller expects %zu", f->origin, t->name, t->numel, n);
    if (t->dtype == ST_F32 && host_is_le()) { if (n) memcpy(out, p, n * 4); return MS_OK; }
    for (size_t i = 0; i < n; i++, p += sz) {
        uint64_t u = load_le(p, sz);
        switch (t->dtype) {
        case ST_BOOL: out[i] = u ? 1.0f : 0.0f; break;
        case ST_U8: case ST_U16: case ST_U32: out[i] = (float)u; break;
        case ST_U64: out[i] = (float)u; break;
        case ST_I8: out[i] = (float)(int8_t)(uint8_t)u; break;      /* two's complement, as in the file */
        case ST_I16: out[i] = (float)(int16_t)(uint16_t)u; break;
        case ST_I32: out[i] = (float)(int32_t)(uint32_t)u; break;
        case ST_I64: out[i] = (float)(int64_t)u; break;
        case ST_F16: out[i] = st_f16_to_f32((uint16_t)u); break;
        case ST_BF16: out[i] = st_bf16_to_f32((uint16_t)u); break;
        case ST_F32: out[i] = bits_f32((uint32_t)u); break;
        case ST_F64: { double d; memcpy(&d, &u, 8); out[i] = (float)d; break; }
        default:
            return ms_errorf(MS_ERR_UNSUPPORTED, "%s: '%.200s': converting %s to float is not supported", f->origin, t->name, dtype_names[t->dtype]);
        }
    }
    return MS_OK;
}

MsStatus st_read_f32(const StFile *f, const char *name, float *out, size_t n, int ndim, const int64_t *shape) {
    const StTensor *t = st_find(f, name);
    MsStatus s;
    if (!t) return ms_errorf(MS_ERR_FORMAT, "%s: no tensor named '%.200s'", f->origin, name);
    if (ndim >= 0 && (s = st_check_shape(f, t, ndim, shape)) != MS_OK) return s;
    return st_to_f32(f, t, out, n);
}

MsStatus st_load_f32(const StFile *f, const char *name, float **out, size_t *n) {
    const StTensor *t = st_find(f, name);
    *out = NULL; *n = 0;
    if (!t) return ms_errorf(MS_ERR_FORMAT, "%s: no tensor named '%.200s'", f->origin, name);
    float *x = (float *)ms_alloc_aligned(t->numel ? t->numel : 1, sizeof(float));
    if (!x) return ms_errorf(MS_ERR_NOMEM, "%s: '%.200s': cannot allocate %zu floats", f->origin, name, t->numel);
    MsStatus s = st_to_f32(f, t, x, t->numel);
    if (s != MS_OK) { ms_free_aligned(x); return s; }
    *out = x; *n = t->numel;
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Writing                                                                                   */
/* ---------------------------------------------------------------------------------------- */
typedef struct { FILE *fp; JsonBuf *mem; const char *name; } Sink;

static MsStatus sink_write(Sink *k, const void *p, size_t n) {
    if (k->mem) return jbuf_append(k->mem, p, n);
    if (n && fwrite(p, 1, n, k->fp) != n) return ms_errorf(MS_ERR_IO, "%s: write failed", k->name);
    return MS_OK;
}

static int cmp_entry(const void *a, const void *b) {   /* decreasing alignment, then name */
    const StEntry *x = *(const StEntry *const *)a, *y = *(const StEntry *const *)b;
    if (x->dtype != y->dtype) return x->dtype > y->dtype ? -1 : 1;
    return strcmp(x->name, y->name);
}


/* Writes the values of e (nbytes in total) as little-endian bytes of its dtype. */
static MsStatus write_data(Sink *k, const StEntry *e, size_t numel) {
    unsigned char chunk[8192];
    size_t sz = dtype_sizes[e->dtype], per = sizeof chunk / sz;
    int swap = !host_is_le();
    for (size_t i0 = 0; i0 < numel; i0 += per) {
        size_t m = numel - i0 < per ? numel - i0 : per;
        if (e->f32) {
            const float *x = e->f32 + i0;
            for (size_t i = 0; i < m; i++) {
                uint64_t u;
                switch (e->dtype) {
                case ST_F16: u = st_f32_to_f16(x[i]); break;
                case ST_BF16: u = st_f32_to_bf16(x[i]); break;
                case ST_F64: { double d = x[i]; memcpy(&u, &d, 8); break; }
                default: u = f32_bits(x[i]); break;       /* F32 (checked by the caller) */
                }
                store_le(chunk + i * sz, u, sz);
            }
        } else {
            memcpy(chunk, (const unsigned char *)e->raw + i0 * sz, m * sz);
            if (swap && sz > 1)                           /* host order -> little-endian */
                for (size_t i = 0; i < m; i++)
                    for (size_t j = 0; j < sz / 2; j++) {
                        unsigned char c = chunk[i * sz + j];
                        chunk[i * sz + j] = chunk[i * sz + sz - 1 - j]; chunk[i * sz + sz - 1 - j] = c;
                    }
        }
        MsStatus s = sink_write(k, chunk, m * sz);
        if (s != MS_OK) return s;
    }
    return MS_OK;
}

static size_t entry_numel(const StEntry *e) {          /* after validate_entry: cannot overflow */
    size_t n = 1;
    for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
    return n;
}

static MsStatus validate_entry(const char *who, const StEntry *e, size_t i) {
    size_t numel = 1, nb;
    if (!e->name || (unsigned)e->dtype >= ST_NDTYPES || e->ndim < 0 || e->ndim > MS_MAX_DIMS)
        return ms_errorf(MS_ERR_ARG, "%s: entry %zu: bad name, dtype or ndim", who, i);
    if (!strcmp(e->name, "__metadata__")) return ms_errorf(MS_ERR_ARG, "%s: a tensor may not be named __metadata__", who);
    for (int d = 0; d < e->ndim; d++)
        if (e->shape[d] < 0 || (uint64_t)e->shape[d] > SIZE_MAX || !ms_mul_ok(numel, (size_t)e->shape[d], &numel))
            return ms_errorf(MS_ERR_ARG, "%s: tensor '%s': bad shape", who, e->name);
    if (!ms_mul_ok(numel, dtype_sizes[e->dtype], &nb)) return ms_errorf(MS_ERR_ARG, "%s: tensor '%s': size overflows", who, e->name);
    if (e->f32 && e->dtype != ST_F32 && e->dtype != ST_F16 && e->dtype != ST_BF16 && e->dtype != ST_F64)
        return ms_errorf(MS_ERR_ARG, "%s: tensor '%s': float input converts to F32/F16/BF16/F64 only, not %s", who, e->name, dtype_names[e->dtype]);
    if (numel && !e->f32 == !e->raw) return ms_errorf(MS_ERR_ARG, "%s: tensor '%s': give exactly one of f32 and raw", who, e->name);
    return MS_OK;
}

/* header: {"__metadata__":{"k":"v"},"name":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},...} */
static MsStatus st_emit(Sink *k, const StEntry *entries, size_t n, const char *const *meta, size_t n_meta) {
    const char *who = k->name;
    const StEntry **order = (const StEntry **)malloc((n ? n : 1) * sizeof *order);
    const char *const **mord = (const char *const **)malloc((n_meta ? n_meta : 1) * sizeof *mord);
    JsonBuf h = { NULL, 0, 0 };
    MsStatus s = MS_OK;
    char num[48];
    if (!order || !mord) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", who); goto done; }
    for (size_t i = 0; i < n && s == MS_OK; i++) { s = validate_entry(who, &entries[i], i); order[i] = &entries[i]; }
    for (size_t i = 0; i < n_meta && s == MS_OK; i++) {
        mord[i] = meta + 2 * i;
        if (!meta[2 * i] || !meta[2 * i + 1]) s = ms_errorf(MS_ERR_ARG, "%s: metadata pair %zu is NULL", who, i);
    }
    if (s != MS_OK) goto done;
    qsort(order, n, sizeof *order, cmp_entry);
    for (size_t i = 1; i < n && s == MS_OK; i++)
        if (!strcmp(order[i]->name, order[i - 1]->name)) s = ms_errorf(MS_ERR_ARG, "%s: two tensors named '%s'", who, order[i]->name);
    for (size_t i = 1; i < n_meta && s == MS_OK; i++)           /* kept in the caller's order */
        for (size_t j = 0; j < i && s == MS_OK; j++)
            if (!strcmp(mord[i][0], mord[j][0])) s = ms_errorf(MS_ERR_ARG, "%s: metadata key '%s' twice", who, mord[i][0]);
    if (s == MS_OK) s = jbuf_puts(&h, "{");
    if (s == MS_OK && n_meta) {
        s = jbuf_puts(&h, "\"__metadata__\":{");
        for (size_t i = 0; i < n_meta && s == MS_OK; i++) {
            if (i) s = jbuf_puts(&h, ",");
            if (s == MS_OK) s = json_write_string(&h, mord[i][0], strlen(mord[i][0]));
            if (s == MS_OK) s = jbuf_puts(&h, ":");
            if (s == MS_OK) s = json_write_string(&h, mord[i][1], strlen(mord[i][1]));
        }
        if (s == MS_OK) s = jbuf_puts(&h, n ? "}," : "}");
    }
    size_t offset = 0, end;
    for (size_t i = 0; i < n && s == MS_OK; i++) {
        const StEntry *e = order[i];
        if (!ms_add_ok(offset, entry_numel(e) * dtype_sizes[e->dtype], &end)) { s = ms_errorf(MS_ERR_ARG, "%s: total size overflows", who); break; }
        if (i) s = jbuf_puts(&h, ",");
        if (s == MS_OK) s = json_write_string(&h, e->name, strlen(e->name));
        if (s == MS_OK) s = jbuf_puts(&h, ":{\"dtype\":\"");
        if (s == MS_OK) s = jbuf_puts(&h, dtype_names[e->dtype]);
        if (s == MS_OK) s = jbuf_puts(&h, "\",\"shape\":[");
        for (int d = 0; d < e->ndim && s == MS_OK; d++) {
            snprintf(num, sizeof num, d ? ",%llu" : "%llu", (unsigned long long)e->shape[d]);
            s = jbuf_puts(&h, num);
        }
        snprintf(num, sizeof num, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset, (unsigned long long)end);
        if (s == MS_OK) s = jbuf_puts(&h, num);
        offset = end;
    }
    if (s == MS_OK) s = jbuf_puts(&h, "}");
    while (s == MS_OK && h.len % 8) s = jbuf_puts(&h, " ");   /* the data section starts 8-byte aligned */
    if (s != MS_OK) goto done;
    unsigned char len8[8];
    store_le(len8, h.len, 8);
    if ((s = sink_write(k, len8, 8)) != MS_OK || (s = sink_write(k, h.data, h.len)) != MS_OK) goto done;
    for (size_t i = 0; i < n && s == MS_OK; i++) s = write_data(k, order[i], entry_numel(order[i]));
done:
    free(order); free(mord); jbuf_free(&h);
    return s;
}

MsStatus st_write_memory(const StEntry *entries, size_t n, const char *const *meta, size_t n_meta,
                         unsigned char **out, size_t *out_size) {
    JsonBuf mem = { NULL, 0, 0 };
    Sink k = { NULL, &mem, "<memory>" };
    MsStatus s = st_emit(&k, entries, n, meta, n_meta);
    if (s != MS_OK) { jbuf_free(&mem); *out = NULL; *out_size = 0; return s; }
    *out = (unsigned char *)mem.data; *out_size = mem.len;
    return MS_OK;
}

MsStatus st_write(const char *path, const StEntry *entries, size_t n, const char *const *meta, size_t n_meta) {
    JsonBuf tmp = { NULL, 0, 0 };
    MsStatus s = jbuf_puts(&tmp, path);
    if (s == MS_OK) s = jbuf_puts(&tmp, ".tmp");
    if (s != MS_OK) return s;
    Sink k = { fopen(tmp.data, "wb"), NULL, tmp.data };
    if (!k.fp) { s = ms_errorf(MS_ERR_IO, "%s: cannot open for writing", tmp.data); jbuf_free(&tmp); return s; }
    s = st_emit(&k, entries, n, meta, n_meta);
    if (fclose(k.fp) != 0 && s == MS_OK) s = ms_errorf(MS_ERR_IO, "%s: write failed", tmp.data);
#ifdef _WIN32
    if (s == MS_OK) remove(path);                        /* rename does not replace on Windows */
#endif
    if (s == MS_OK && rename(tmp.data, path) != 0) s = ms_errorf(MS_ERR_IO, "%s: cannot rename to %s", tmp.data, path);
    if (s != MS_OK) remove(tmp.data);                    /* nothing half-written stays behind */
    jbuf_free(&tmp);
    return s;
}
