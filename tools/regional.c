/* tools/regional.c — the text side of regionally controllable sampling: Mix-of-Show's
 * --prompt_rewrite and --region_*_adaptor_weight strings (regionally_controlable_sampling.py
 * prepare_text and RegionallyT2IAdapterPipeline.__call__, commit 51270fd), fused-model concept
 * files (new_concept_cfg.json, tokenizer/added_tokens.json) and the PNG tEXt chunk. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir */
#endif
#include "tools/tools.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <direct.h>
static int rg_make_dir(const char *p) { return _mkdir(p); }
#else
#include <sys/stat.h>
#include <sys/types.h>
static int rg_make_dir(const char *p) { return mkdir(p, 0777); }
#endif

/* str.replace('[', '').replace(']', '') */
static char *strip_brackets(const char *a, size_t n) {
    char *s = (char *)malloc(n + 1), *o = s;
    if (!s) return NULL;
    for (size_t i = 0; i < n; i++)
        if (a[i] != '[' && a[i] != ']') *o++ = a[i];
    *o = 0;
    return s;
}

/* eval() of a Python list literal of numbers: "[12, 36, 1024, 600]" or "[]" (whitespace allowed,
 * a trailing comma too). Returns the count (<= cap) or -1. */
static int parse_num_list(const char *a, size_t n, double *v, int cap) {
    size_t i = 0;
    int k = 0;
    while (i < n && isspace((unsigned char)a[i])) i++;
    if (i >= n || a[i] != '[') return -1;
    i++;
    for (;;) {
        while (i < n && isspace((unsigned char)a[i])) i++;
        if (i < n && a[i] == ']') { i++; break; }
        if (k >= cap || i >= n) return -1;
        char buf[64];
        size_t j = i;
        while (j < n && (isdigit((unsigned char)a[j]) || a[j] == '.' || a[j] == '-' || a[j] == '+' || a[j] == 'e' ||
                         a[j] == 'E')) j++;
        if (j == i || j - i >= sizeof buf) return -1;
        memcpy(buf, a + i, j - i);
        buf[j - i] = 0;
        char *end;
        v[k] = strtod(buf, &end);
        if (*end || !(v[k] == v[k])) return -1;
        k++;
        i = j;
        while (i < n && isspace((unsigned char)a[i])) i++;
        if (i < n && a[i] == ',') { i++; continue; }
        if (i < n && a[i] == ']') { i++; break; }
        return -1;
    }
    while (i < n && isspace((unsigned char)a[i])) i++;
    return i == n ? k : -1;
}

void regional_list_free(RegionList *l) {
    for (int i = 0; i < l->n; i++) { free(l->r[i].prompt); free(l->r[i].negative); }
    memset(l, 0, sizeof *l);
}

MsStatus regional_parse_rewrite(const char *s, int height, int width, RegionList *out) {
    memset(out, 0, sizeof *out);
    if (!s) return MS_OK;
    const char *p = s;
    for (int idx = 1;; idx++) {
        const char *bar = strchr(p, '|'), *e = bar ? bar : p + strlen(p);
        if (e == p) break;                                  /* if region == '': break */
        /* region.split('-*-') must give three parts */
        const char *d1 = NULL, *d2 = NULL, *q;
        int nd = 0;
        for (q = p; q + 3 <= e; q++)
            if (q[0] == '-' && q[1] == '*' && q[2] == '-') {
                if (nd == 0) d1 = q; else if (nd == 1) d2 = q;
                nd++;
                q += 2;
            }
        if (nd != 2) {
            regional_list_free(out);
            return ms_errorf(MS_ERR_ARG, "--prompt_rewrite: region %d \"%.*s\": expected [prompt]-*-[negative]-*-[top, left, "
                             "bottom, right], found %d '-*-' separator(s)", idx, (int)(e - p > 80 ? 80 : e - p), p, nd);
        }
        if (out->n >= MS_REGION_MAX) {
            regional_list_free(out);
            return ms_errorf(MS_ERR_ARG, "--prompt_rewrite: more than %d regions", MS_REGION_MAX);
        }
        RegionSpec *r = &out->r[out->n];
        double v[8];
        int nv = parse_num_list(d2 + 3, (size_t)(e - d2 - 3), v, 8);
        if (nv != 0 && nv != 4) {
            regional_list_free(out);
            return ms_errorf(MS_ERR_ARG, "--prompt_rewrite: region %d: position \"%.*s\": expected [] or [top, left, bottom, "
                             "right] in pixels", idx, (int)(e - d2 - 3 > 60 ? 60 : e - d2 - 3), d2 + 3);
        }
        r->prompt = strip_brackets(p, (size_t)(d1 - p));
        r->negative = strip_brackets(d1 + 3, (size_t)(d2 - d1 - 3));
        out->n++;
        if (!r->prompt || !r->negative) { regional_list_free(out); return ms_errorf(MS_ERR_NOMEM, "out of memory"); }
        if (nv == 0) {                                      /* pos = [0, 0, 1, 1] */
            r->full = 1;
            r->pix[0] = r->pix[1] = 0; r->pix[2] = height; r->pix[3] = width;
            r->box[0] = 0; r->box[1] = 0; r->box[2] = 1; r->box[3] = 1;
        } else {
            memcpy(r->pix, v, sizeof r->pix);
            r->box[0] = v[0] / height; r->box[2] = v[2] / height;   /* pos[0] / height, pos[2] / height */
            r->box[1] = v[1] / width; r->box[3] = v[3] / width;
            if (!(v[0] >= 0 && v[1] >= 0 && v[2] <= height && v[3] <= width && v[0] < v[2] && v[1] < v[3])) {
                MsStatus st = ms_errorf(MS_ERR_ARG, "--prompt_rewrite: region %d box [%g, %g, %g, %g] (top, left, bottom, "
                                        "right): %s the %d x %d image", idx, v[0], v[1], v[2], v[3],
                                        v[0] < v[2] && v[1] < v[3] ? "outside" : "has zero area in", width, height);
                regional_list_free(out);
                return st;
            }
        }
        if (!bar) break;
        p = bar + 1;
    }
    return MS_OK;
}

MsStatus regional_parse_weights(const char *s, const char *what, int height, int width, int *n, double (*box)[4],
                                float *w, int cap) {
    *n = 0;
    if (!s || !*s) return MS_OK;                            /* region_*_adaptor_weight == '' */
    const char *p = s;
    for (int idx = 1;; idx++) {
        const char *bar = strchr(p, '|'), *e = bar ? bar : p + strlen(p), *dash = NULL;
        int nd = 0;
        for (const char *q = p; q < e; q++)
            if (*q == '-') { if (!nd) dash = q; nd++; }
        if (nd != 1)                                        /* region, weight = region_weight.split('-') */
            return ms_errorf(MS_ERR_ARG, "%s: item %d \"%.*s\": expected [top, left, bottom, right]-weight", what, idx,
                             (int)(e - p > 60 ? 60 : e - p), p);
        if (*n >= cap) return ms_errorf(MS_ERR_ARG, "%s: more than %d regions", what, cap);
        double v[4];
        if (parse_num_list(p, (size_t)(dash - p), v, 4) != 4)
            return ms_errorf(MS_ERR_ARG, "%s: item %d: box \"%.*s\": expected [top, left, bottom, right] in pixels", what,
                             idx, (int)(dash - p > 60 ? 60 : dash - p), p);
        char buf[64], *end;
        size_t wl = (size_t)(e - dash - 1);
        while (wl && isspace((unsigned char)dash[1 + wl - 1])) wl--;
        const char *ws = dash + 1;
        while (wl && isspace((unsigned char)*ws)) { ws++; wl--; }
        if (!wl || wl >= sizeof buf) return ms_errorf(MS_ERR_ARG, "%s: item %d: no weight after '-'", what, idx);
        memcpy(buf, ws, wl);
        buf[wl] = 0;
        double x = strtod(buf, &end);
        if (*end || !(x == x)) return ms_errorf(MS_ERR_ARG, "%s: item %d: weight \"%s\" is not a number", what, idx, buf);
        if (!(v[0] >= 0 && v[1] >= 0 && v[2] <= height && v[3] <= width && v[0] < v[2] && v[1] < v[3]))
            return ms_errorf(MS_ERR_ARG, "%s: item %d box [%g, %g, %g, %g]: %s the %d x %d image", what, idx, v[0], v[1],
                             v[2], v[3], v[0] < v[2] && v[1] < v[3] ? "outside" : "has zero area in", width, height);
        memcpy(box[*n], v, sizeof v);
        w[*n] = (float)x;
        (*n)++;
        if (!bar) break;
        p = bar + 1;
    }
    return MS_OK;
}

/* ---- fused models: new_concept_cfg.json + tokenizer/added_tokens.json ---- */
void regional_concepts_free(RegionalConcepts *c) {
    free(c->words); free(c->tokens); free(c->word_ptr); free(c->token_ptr);
    memset(c, 0, sizeof *c);
}

MsStatus regional_concepts_load(const char *dir, ClipTokenizer *tok, int n_layers, RegionalConcepts *c) {
    char p[4200];
    JsonValue *cfg = NULL;
    MsStatus s = MS_OK;
    memset(c, 0, sizeof *c);
    /* added tokens first (from_pretrained: tokenizer/added_tokens.json, {token: id}), in id order;
     * ms_open_model has read them already (then nothing is added) */
    snprintf(p, sizeof p, "%s/tokenizer/added_tokens.json", dir);
    FILE *f = fopen(p, "rb");
    if (f) {
        fclose(f);
        if ((s = ms_clip_added_tokens_json(p, tok))) return s;
    }
    snprintf(p, sizeof p, "%s/new_concept_cfg.json", dir);
    f = fopen(p, "rb");
    if (f) {
        fclose(f);
        if ((s = json_parse_file(p, &cfg))) goto done;
    } else {                  /* a single file from `mixshow fuse --ldm-out`: its metadata holds the cfg */
        StFile sf;
        const char *txt;
        if (st_open(&sf, dir) != MS_OK) { ms_clear_error(); goto done; }   /* a plain model: no concepts */
        snprintf(p, sizeof p, "%.4000s: metadata mixshow.new_concept_cfg", dir);
        txt = st_meta(&sf, "mixshow.new_concept_cfg");
        if (txt) s = json_parse(txt, strlen(txt), p, &cfg);
        st_close(&sf);
        if (!txt || s) goto done;
    }
    if (cfg->type != JSON_OBJECT) { s = ms_errorf(MS_ERR_FORMAT, "%s: expected an object {concept word: {...}}", p); goto done; }
    c->n_words = (int)cfg->count;
    c->n_layers = n_layers;
    c->words = (char (*)[MS_WORD_MAX])calloc(cfg->count ? cfg->count : 1, sizeof *c->words);
    c->tokens = (char (*)[24])calloc((cfg->count ? cfg->count : 1) * (size_t)n_layers, sizeof *c->tokens);
    c->word_ptr = (const char **)calloc(cfg->count ? cfg->count : 1, sizeof *c->word_ptr);
    c->token_ptr = (const char **)calloc((cfg->count ? cfg->count : 1) * (size_t)n_layers, sizeof *c->token_ptr);
    if (!c->words || !c->tokens || !c->word_ptr || !c->token_ptr) { s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", p); goto done; }
    for (size_t k = 0; k < cfg->count; k++) {
        const JsonValue *e = &cfg->items[k], *names = NULL;
        if (strlen(e->key) >= MS_WORD_MAX) { s = ms_errorf(MS_ERR_FORMAT, "%s: concept word '%.40s...' is too long", p, e->key); goto done; }
        strcpy(c->words[k], e->key);
        c->word_ptr[k] = c->words[k];
        if ((s = json_need(e, "concept_token_names", JSON_ARRAY, &names))) goto done;
        if ((int)names->count != n_layers) {
            s = ms_errorf(MS_ERR_FORMAT, "%s: '%s': %zu concept_token_names, expected %d (one per cross-attention layer)", p,
                          e->key, names->count, n_layers);
            goto done;
        }
        for (int i = 0; i < n_layers; i++) {
            const JsonValue *t = &names->items[i];
            if (t->type != JSON_STRING || t->len >= 24) { s = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: expected a token name", p, t->line, t->col); goto done; }
            if (clip_tokenizer_find(tok, t->str, t->len) < 0) {
                s = ms_errorf(MS_ERR_FORMAT, "%s: '%s' token '%s' is not in the tokenizer (tokenizer/added_tokens.json)", p,
                              e->key, t->str);
                goto done;
            }
            strcpy(c->tokens[k * (size_t)n_layers + i], t->str);
            c->token_ptr[k * (size_t)n_layers + i] = c->tokens[k * (size_t)n_layers + i];
        }
    }
done:
    json_free(cfg);
    if (s) regional_concepts_free(c);
    return s;
}

/* Words that look like concept words ("<...>") but are not known: tokenized as plain text. */
void regional_warn_unknown(const char *text, const char *where, const char *const *known, int n_known) {
    for (const char *q = strchr(text, '<'); q; q = strchr(q + 1, '<')) {
        const char *e = strchr(q, '>');
        if (!e) break;
        size_t n = (size_t)(e - q + 1);
        int ok = n > 2 && n < 40;
        for (size_t i = 1; ok && i + 1 < n; i++)
            if (isspace((unsigned char)q[i]) || q[i] == '<') ok = 0;
        if (!ok) continue;
        int found = 0;
        for (int k = 0; k < n_known && !found; k++) found = strlen(known[k]) == n && !strncmp(known[k], q, n);
        if (!found)
            fprintf(stderr, "mixshow sample: warning: %s: '%.*s' is not a concept word of this model; it is tokenized as "
                    "plain text\n", where, (int)n, q);
    }
}

/* ---- PNG with a tEXt chunk ---- */
MsStatus regional_png_write_text(const char *path, const uint8_t *px, int w, int h, int C, const char *key,
                                 const char *text) {
    uint8_t *png = NULL;
    size_t len = 0;
    MsStatus s = ms_png_encode(px, w, h, C, &png, &len);
    if (s) return s;
    const size_t kl = strlen(key), tl = strlen(text), cl = kl + 1 + tl;
    if (len < 33 || kl < 1 || kl > 79 || cl > 0x7fffffffu) { free(png); return ms_errorf(MS_ERR_ARG, "%s: bad tEXt chunk", path); }
    uint8_t *chunk = (uint8_t *)malloc(cl + 12);
    if (!chunk) { free(png); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
    chunk[0] = (uint8_t)(cl >> 24); chunk[1] = (uint8_t)(cl >> 16); chunk[2] = (uint8_t)(cl >> 8); chunk[3] = (uint8_t)cl;
    memcpy(chunk + 4, "tEXt", 4);
    memcpy(chunk + 8, key, kl);
    chunk[8 + kl] = 0;
    for (size_t i = 0; i < tl; i++) {                       /* Latin-1 text: other bytes become '?' */
        unsigned char ch = (unsigned char)text[i];
        chunk[9 + kl + i] = (ch == '\n' || (ch >= 32 && ch < 127)) ? ch : '?';
    }
    uint32_t crc = ms_crc32(0, chunk + 4, cl + 4);
    chunk[8 + cl] = (uint8_t)(crc >> 24); chunk[9 + cl] = (uint8_t)(crc >> 16);
    chunk[10 + cl] = (uint8_t)(crc >> 8); chunk[11 + cl] = (uint8_t)crc;
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    int ok = f && fwrite(png, 1, 33, f) == 33 && fwrite(chunk, 1, cl + 12, f) == cl + 12 &&   /* after IHDR */
             fwrite(png + 33, 1, len - 33, f) == len - 33;
    if (f && fclose(f)) ok = 0;
    free(png);
    free(chunk);
    if (!ok || rename(tmp, path)) { remove(tmp); return ms_errorf(MS_ERR_IO, "%s: cannot write", path); }
    return MS_OK;
}

/* ---- SHA-256 (FIPS 180-4), for the official output name's hash ---- */
static uint32_t ror32(uint32_t x, int r) { return (x >> r) | (x << (32 - r)); }
static void sha256(const uint8_t *msg, size_t len, uint8_t out[32]) {
    static const uint32_t K[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2 };
    uint32_t H[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
    const size_t nblk = (len + 9 + 63) / 64;
    for (size_t b = 0; b < nblk; b++) {
        uint8_t blk[64];
        uint32_t w[64];
        for (int i = 0; i < 64; i++) {
            size_t k = b * 64 + (size_t)i;
            uint64_t bits = (uint64_t)len * 8;
            blk[i] = k < len ? msg[k] : k == len ? 0x80 : 0;
            if (b == nblk - 1 && i >= 56) blk[i] = (uint8_t)(bits >> (8 * (63 - i)));
        }
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)blk[4 * i] << 24 | (uint32_t)blk[4 * i + 1] << 16 | (uint32_t)blk[4 * i + 2] << 8 | blk[4 * i + 3];
        for (int i = 16; i < 64; i++) {
            uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = H[0], bb = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
        for (int i = 0; i < 64; i++) {
            uint32_t t1 = h + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
            uint32_t t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & bb) ^ (a & c) ^ (bb & c));
            h = g; g = f; f = e; e = d + t1; d = c; c = bb; bb = a; a = t1 + t2;
        }
        H[0] += a; H[1] += bb; H[2] += c; H[3] += d; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
    }
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(H[i] >> 24); out[4 * i + 1] = (uint8_t)(H[i] >> 16);
        out[4 * i + 2] = (uint8_t)(H[i] >> 8); out[4 * i + 3] = (uint8_t)H[i];
    }
}

/* Python repr(float): the shortest %.{p}g that reads back, with ".0" for integral values. */
static void py_float(char *buf, size_t cap, double x) {
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, cap, "%.*g", p, x);
        if (strtod(buf, NULL) == x) break;
    }
    if (!strpbrk(buf, ".eEn")) strncat(buf, ".0", cap - strlen(buf) - 1);
}

/* ---- `mixshow sample` with the official regionally_controlable_sampling.py options ---- */
static const char *const REGIONAL_OPTS[] = {
    "--pretrained_model", "--prompt_rewrite", "--negative_prompt", "--keypose_condition", "--keypose_adaptor_weight",
    "--region_keypose_adaptor_weight", "--sketch_condition", "--sketch_adaptor_weight", "--region_sketch_adaptor_weight",
    "--save_dir", "--suffix", "--adapter-keypose", "--adapter-sketch", "--overlay", "--trace" };

int regional_wanted(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        for (size_t k = 0; k < sizeof REGIONAL_OPTS / sizeof REGIONAL_OPTS[0]; k++) {
            size_t n = strlen(REGIONAL_OPTS[k]);
            if (!strncmp(argv[i], REGIONAL_OPTS[k], n) && (argv[i][n] == 0 || argv[i][n] == '=')) return 1;
        }
    return 0;
}

typedef struct { StEntry *e; size_t n, cap; int failed; } RgTrace;
static void rg_trace(void *ctx, const char *name, const float *x, int ndim, const int64_t *shape) {
    RgTrace *t = (RgTrace *)ctx;
    size_t numel = 1;
    if (t->failed) return;
    if (t->n == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 64;
        StEntry *e = (StEntry *)realloc(t->e, cap * sizeof *e);
        if (!e) { t->failed = 1; return; }
        t->e = e; t->cap = cap;
    }
    for (int i = 0; i < ndim; i++) numel *= (size_t)shape[i];
    float *copy = (float *)malloc(numel * sizeof(float));
    char *nm = (char *)malloc(strlen(name) + 1);
    if (!copy || !nm) { free(copy); free(nm); t->failed = 1; return; }
    memcpy(copy, x, numel * sizeof(float));
    strcpy(nm, name);
    StEntry *e = &t->e[t->n++];
    memset(e, 0, sizeof *e);
    e->name = nm; e->dtype = ST_F32; e->ndim = ndim; e->f32 = copy;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
}

static int rg_exists(const char *p) { FILE *f = fopen(p, "rb"); if (f) fclose(f); return f != NULL; }

/* the adapter folder: --adapter-* DIR, else MODEL/t2iadapter_<name>, else models/t2iadapter_<name>_sd14v1 */
static const char *rg_adapter_dir(const char *given, const char *model, const char *name, char *buf, size_t cap) {
    if (given) return given;
    snprintf(buf, cap, "%s/t2iadapter_%s/config.json", model, name);
    if (rg_exists(buf)) { snprintf(buf, cap, "%s/t2iadapter_%s", model, name); return buf; }
    snprintf(buf, cap, "models/t2iadapter_%s_sd14v1/config.json", name);
    if (rg_exists(buf)) { snprintf(buf, cap, "models/t2iadapter_%s_sd14v1", name); return buf; }
    return NULL;
}

static MsStatus rg_mkdirs(const char *path);

int cmd_sample_regional(int argc, char **argv) {
    const char *model = NULL, *prompt = "photo of a toy", *neg = "", *rewrite = "", *kp_cond = NULL, *sk_cond = NULL;
    const char *kp_rw = "", *sk_rw = "", *save_dir = NULL, *suffix = "", *kp_dir = NULL, *sk_dir = NULL, *trace = NULL;
    const char *out = NULL, *edlora = NULL;
    const char *kp_w_str = "1.0", *sk_w_str = "1.0";
    double kp_w = 1.0, sk_w = 1.0;
    long long seed = 16141;
    int overlay = 0, steps = 50, W = 0, H = 0, threads = -1;
    float cfg = 7.5f, edlora_alpha = 0.7f;
    for (int i = 1; i < argc; i++) {
        char name[64];
        const char *a = argv[i], *v = NULL, *eq = !strncmp(a, "--", 2) ? strchr(a, '=') : NULL;
        if (!strcmp(a, "--overlay")) { overlay = 1; continue; }
        if (eq && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = 0;
            a = name;
            v = eq + 1;
        } else {
            if (i + 1 >= argc) { fprintf(stderr, "mixshow sample: %s needs a value\n", a); return 2; }
            v = argv[++i];
        }
        char *end = NULL;
        if (!strcmp(a, "--pretrained_model") || !strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--prompt") || !strcmp(a, "-p")) prompt = v;
        else if (!strcmp(a, "--negative_prompt") || !strcmp(a, "-n")) neg = v;
        else if (!strcmp(a, "--prompt_rewrite")) rewrite = v;
        else if (!strcmp(a, "--keypose_condition")) kp_cond = v;
        else if (!strcmp(a, "--sketch_condition")) sk_cond = v;
        else if (!strcmp(a, "--keypose_adaptor_weight")) { kp_w_str = v; kp_w = strtod(v, &end); }
        else if (!strcmp(a, "--sketch_adaptor_weight")) { sk_w_str = v; sk_w = strtod(v, &end); }
        else if (!strcmp(a, "--region_keypose_adaptor_weight")) kp_rw = v;
        else if (!strcmp(a, "--region_sketch_adaptor_weight")) sk_rw = v;
        else if (!strcmp(a, "--save_dir")) save_dir = v;
        else if (!strcmp(a, "--suffix")) suffix = v;
        else if (!strcmp(a, "--seed")) seed = strtoll(v, &end, 10);
        else if (!strcmp(a, "--adapter-keypose")) kp_dir = v;
        else if (!strcmp(a, "--adapter-sketch")) sk_dir = v;
        else if (!strcmp(a, "--trace")) trace = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--steps")) steps = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--cfg")) cfg = strtof(v, &end);
        else if (!strcmp(a, "-W") || !strcmp(a, "--width")) W = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "-H") || !strcmp(a, "--height")) H = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--threads")) threads = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--edlora")) {
            const char *colon = strrchr(v, ':');
            char *e2 = NULL;
            if (colon) { float al = strtof(colon + 1, &e2); if (e2 != colon + 1 && !*e2) edlora_alpha = al; else colon = NULL; }
            static char path[2048];
            size_t n = colon ? (size_t)(colon - v) : strlen(v);
            if (!n || n >= sizeof path) { fprintf(stderr, "mixshow sample: --edlora %s: bad path\n", v); return 2; }
            memcpy(path, v, n); path[n] = 0;
            edlora = path;
        } else { fprintf(stderr, "mixshow sample: unknown option '%s' (regional sampling; see --help)\n", a); return 2; }
        if (end && (*end || end == v)) { fprintf(stderr, "mixshow sample: %s %s: not a number\n", a, v); return 2; }
    }
    /* no --pretrained_model: the shipped world model, else the tiny one, under a data root (the
     * config text below, whose hash names the file, keeps the short name) */
    char def_dir[4200];
    const char *model_name = model;
    if (!model) {
        if (!(model_name = ms_default_model(def_dir, sizeof def_dir))) {
            fprintf(stderr, "mixshow sample: no --pretrained_model, and neither models/world nor models/tiny-sd was found "
                    "(next to the executable, in the install prefix or here)\n");
            return 2;
        }
        model = def_dir;
    }
    if (!out && !save_dir) { fprintf(stderr, "mixshow sample: --save_dir DIR (or -o OUT.png) is required\n"); return 2; }
    /* the official script skips a condition whose path does not exist (the .sh passes '') */
    if (kp_cond && !rg_exists(kp_cond)) {
        if (*kp_cond) fprintf(stderr, "mixshow sample: warning: --keypose_condition %s does not exist: skipped (as the official script)\n", kp_cond);
        kp_cond = NULL;
    }
    if (sk_cond && !rg_exists(sk_cond)) {
        if (*sk_cond) fprintf(stderr, "mixshow sample: warning: --sketch_condition %s does not exist: skipped (as the official script)\n", sk_cond);
        sk_cond = NULL;
    }
    const char *kp_orig = NULL, *sk_orig = NULL;   /* for the config text: None when not given */
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "--keypose_condition", 19)) kp_orig = argv[i][19] == '=' ? argv[i] + 20 : i + 1 < argc ? argv[i + 1] : "";
        if (!strncmp(argv[i], "--sketch_condition", 18)) sk_orig = argv[i][18] == '=' ? argv[i] + 19 : i + 1 < argc ? argv[i + 1] : "";
    }

    MsModel m;
    ClipTokenizer tok;
    AdapterConfig kac, sac;
    MsParamTable kat, sat;
    AdapterParams kap, sap;
    MsImage ki, si;
    RegionList rl;
    RegionalConcepts rc;
    EdloraFile ef;
    EdloraPrompt ep;
    MsRegionalOptions o;
    RgTrace tr;
    MsRegion regs[MS_REGION_MAX];
    double kbox[MS_REGION_MAX][4], sbox[MS_REGION_MAX][4];
    float kbw[MS_REGION_MAX], sbw[MS_REGION_MAX];
    int have_m = 0, have_tok = 0, have_ka = 0, have_sa = 0;
    float *image = NULL, *kc = NULL, *sc = NULL;
    uint8_t *px = NULL;
    char kbuf[2300], sbuf[2300], outpath[4400], *meta = NULL;
    memset(&rl, 0, sizeof rl); memset(&rc, 0, sizeof rc); memset(&ef, 0, sizeof ef); memset(&ep, 0, sizeof ep);
    memset(&o, 0, sizeof o); memset(&tr, 0, sizeof tr); memset(&ki, 0, sizeof ki); memset(&si, 0, sizeof si);
    MsStatus s = ms_open_model(model, NULL, &m, &tok, NULL, 0);
    if (!s) { have_m = have_tok = 1; }
    if (!s) { s = regional_concepts_load(model, &tok, ms_unet_cross_attn_layers(&m.unet_config), &rc); }
    if (threads >= 0) ms_set_threads(threads);
    else if (!s && m.unet_config.block_out_channels[0] < 128 && !getenv("OMP_NUM_THREADS")) ms_set_threads(1);
    /* size: the conditions' (equal when both are given), else -W/-H, else the UNet's default */
    if (!s && kp_cond && !(s = ms_image_read(kp_cond, 3, &ki))) { W = ki.w; H = ki.h; }
    if (!s && sk_cond && !(s = ms_image_read(sk_cond, 1, &si))) {
        if (kp_cond && (si.w != ki.w || si.h != ki.h))
            s = ms_errorf(MS_ERR_ARG, "--sketch_condition %s is %d x %d, --keypose_condition %s is %d x %d: conditions should "
                          "be the same size", sk_cond, si.w, si.h, kp_cond, ki.w, ki.h);
        W = si.w; H = si.h;
    }
    if (!s && !kp_cond && !sk_cond) {                      /* unet.config.sample_size * vae_scale_factor */
        if (!W) W = m.unet_config.sample_size << (m.vae_config.n_blocks - 1);
        if (!H) H = m.unet_config.sample_size << (m.vae_config.n_blocks - 1);
    }
    if (!s) s = regional_parse_rewrite(rewrite, H, W, &rl);
    int nkb = 0, nsb = 0;
    if (!s) s = regional_parse_weights(kp_rw, "--region_keypose_adaptor_weight", H, W, &nkb, kbox, kbw, MS_REGION_MAX);
    if (!s) s = regional_parse_weights(sk_rw, "--region_sketch_adaptor_weight", H, W, &nsb, sbox, sbw, MS_REGION_MAX);
    if (!s && edlora) {
        s = edlora_read(edlora, &ef);
        if (!s) s = edlora_merge(&m, &ef, edlora_alpha);
        if (!s) s = edlora_prepare(&ef, &tok, &m, &ep, &o.base);
    } else if (!s && rc.n_words) {
        o.base.n_layer_ctx = rc.n_layers;
        o.base.n_bind = rc.n_words;
        o.base.bind_word = rc.word_ptr;
        o.base.bind_token = rc.token_ptr;
    }
    if (!s) {
        const char *const *known = o.base.bind_word;
        int nk = o.base.n_bind;
        regional_warn_unknown(prompt, "--prompt", known, nk);
        for (int r = 0; r < rl.n; r++) {
            char where[64];
            snprintf(where, sizeof where, "--prompt_rewrite region %d", r + 1);
            regional_warn_unknown(rl.r[r].prompt, where, known, nk);
        }
    }
    if (!s && kp_cond) {
        const char *d = rg_adapter_dir(kp_dir, model, "openpose", kbuf, sizeof kbuf);
        if (!d) s = ms_errorf(MS_ERR_ARG, "--keypose_condition: no keypose adapter: give --adapter-keypose DIR "
                              "(TencentARC/t2iadapter_openpose_sd14v1; looked in %s/t2iadapter_openpose and "
                              "models/t2iadapter_openpose_sd14v1)", model);
        if (!s) s = ms_adapter_load(d, NULL, &kac, &kat);
        if (!s) { have_ka = 1; s = adapter_params_init(&kap, &kac, &kat); }
        if (!s && kac.in_channels != 3)
            s = ms_errorf(MS_ERR_ARG, "%s: the keypose adapter takes %d input channel(s), a keypose condition is RGB (3)", d, kac.in_channels);
        if (!s) s = sample_load_cond(kp_cond, 3, W, H, &kc);
        if (!s) { o.keypose.adapter = &kap; o.keypose.cond = kc; }
    }
    if (!s && sk_cond) {
        const char *d = rg_adapter_dir(sk_dir, model, "sketch", sbuf, sizeof sbuf);
        if (!d) s = ms_errorf(MS_ERR_ARG, "--sketch_condition: no sketch adapter: give --adapter-sketch DIR "
                              "(TencentARC/t2iadapter_sketch_sd14v1; looked in %s/t2iadapter_sketch and "
                              "models/t2iadapter_sketch_sd14v1)", model);
        if (!s) s = ms_adapter_load(d, NULL, &sac, &sat);
        if (!s) { have_sa = 1; s = adapter_params_init(&sap, &sac, &sat); }
        if (!s && sac.in_channels != 1)
            s = ms_errorf(MS_ERR_ARG, "%s: the sketch adapter takes %d input channel(s), a sketch condition is grey (1)", d, sac.in_channels);
        if (!s) s = sample_load_cond(sk_cond, 1, W, H, &sc);
        if (!s) { o.sketch.adapter = &sap; o.sketch.cond = sc; }
    }
    o.keypose.weight = (float)kp_w; o.keypose.n_box = nkb; o.keypose.box = (const double (*)[4])kbox; o.keypose.box_weight = kbw;
    o.sketch.weight = (float)sk_w; o.sketch.n_box = nsb; o.sketch.box = (const double (*)[4])sbox; o.sketch.box_weight = sbw;
    for (int r = 0; r < rl.n; r++) {
        regs[r].prompt = rl.r[r].prompt;
        regs[r].negative = rl.r[r].negative;
        memcpy(regs[r].box, rl.r[r].box, sizeof regs[r].box);
    }
    o.n_regions = rl.n;
    o.regions = regs;
    o.base.prompt = prompt; o.base.negative = neg; o.base.width = W; o.base.height = H; o.base.steps = steps;
    o.base.guidance_scale = cfg; o.base.seed = (uint64_t)seed; o.base.sampler = MS_SCHED_DPMSOLVER;
    o.base.torch_cpu = MS_TORCH_CPU_AVX2; o.base.batch = 1;
    if (trace) { o.trace = rg_trace; o.trace_ctx = &tr; }
    const size_t per = (size_t)3 * W * H;
    if (!s && (!(image = (float *)ms_alloc_aligned(per, sizeof(float))) || !(px = (uint8_t *)malloc(per))))
        s = ms_errorf(MS_ERR_NOMEM, "out of memory for a %d x %d image", W, H);
    double t0 = ms_time();
    if (!s) s = ms_regional_sample(&m, &tok, &o, image);
    double t1 = ms_time();
    if (!s && tr.failed) s = ms_errorf(MS_ERR_NOMEM, "trace: out of memory");
    if (!s && trace) {
        char nbuf[32];
        snprintf(nbuf, sizeof nbuf, "%d", steps);
        const char *mt[4] = { "format", "mixshow-regional-trace", "steps", nbuf };
        s = st_write(trace, tr.e, tr.n, mt, 2);
    }
    /* the official config text (its sha256 names the file) */
    if (!s) {
        char kw[64], sw[64], seedb[32];
        py_float(kw, sizeof kw, kp_w); py_float(sw, sizeof sw, sk_w);
        snprintf(seedb, sizeof seedb, "%lld", seed);
        (void)kp_w_str; (void)sk_w_str;
        const char *parts[] = { "pretrained_model: ", model_name, "\n", "context_prompt: ", prompt, "\n",
                                "neg_context_prompt: ", neg, "\n", "sketch_condition: ", sk_orig ? sk_orig : "None", "\n",
                                "sketch_adaptor_weight: ", sw, "\n", "region_sketch_adaptor_weight: ", sk_rw, "\n",
                                "keypose_condition: ", kp_orig ? kp_orig : "None", "\n", "keypose_adaptor_weight: ", kw, "\n",
                                "region_keypose_adaptor_weight: ", kp_rw, "\n", "random seed: ", seedb, "\n",
                                "prompt_rewrite: ", rewrite, "\n" };
        size_t n = 1;
        for (size_t k = 0; k < sizeof parts / sizeof parts[0]; k++) n += strlen(parts[k]);
        if (!(meta = (char *)malloc(n))) s = ms_errorf(MS_ERR_NOMEM, "out of memory");
        else {
            meta[0] = 0;
            for (size_t k = 0; k < sizeof parts / sizeof parts[0]; k++) strcat(meta, parts[k]);
        }
    }
    if (!s) {
        if (out) snprintf(outpath, sizeof outpath, "%s", out);
        else {
            uint8_t hsh[32];
            char hex[9], *sp = (char *)malloc(strlen(prompt) + 1);
            sha256((const uint8_t *)meta, strlen(meta), hsh);
            for (int k = 0; k < 4; k++) snprintf(hex + 2 * k, 3, "%02x", hsh[k]);
            if (!sp) s = ms_errorf(MS_ERR_NOMEM, "out of memory");
            else {
                for (size_t k = 0; prompt[k]; k++) sp[k] = prompt[k] == ' ' ? '_' : prompt[k];
                sp[strlen(prompt)] = 0;
                snprintf(outpath, sizeof outpath, "%s/seed_%lld", save_dir, seed);
                s = rg_mkdirs(outpath);
                snprintf(outpath, sizeof outpath, "%s/seed_%lld/%s---%s---%s.png", save_dir, seed, sp, suffix, hex);
                free(sp);
            }
        }
    }
    if (!s) {
        ms_image_to_u8(px, image, 3, H, W);
        s = regional_png_write_text(outpath, px, W, H, 3, "mixshow", meta);
        if (!s) fprintf(stderr, "mixshow sample: wrote %s (%d x %d, %d regions, %.2f s)\n", outpath, W, H, rl.n, t1 - t0);
    }
    if (!s && save_dir && !out) {                 /* the .txt next to it, as the official script */
        char tp[4400];
        snprintf(tp, sizeof tp, "%.*s.txt", (int)(strlen(outpath) - 4), outpath);
        FILE *f = fopen(tp, "wb");
        if (!f || fputs(meta, f) < 0 || fclose(f)) s = ms_errorf(MS_ERR_IO, "%s: cannot write", tp);
    }
    if (!s && overlay) {
        const char *lab[MS_REGION_MAX];
        double pb[MS_REGION_MAX][4];
        char op[4400];
        for (int r = 0; r < rl.n; r++) { lab[r] = rl.r[r].prompt; memcpy(pb[r], rl.r[r].pix, sizeof pb[r]); }
        regional_overlay(px, W, H, rl.n, (const double (*)[4])pb, lab);
        snprintf(op, sizeof op, "%.*s-overlay.png", (int)(strlen(outpath) - 4), outpath);
        s = regional_png_write_text(op, px, W, H, 3, "mixshow", meta);
        if (!s) fprintf(stderr, "mixshow sample: wrote %s\n", op);
    }
    if (s) fprintf(stderr, "mixshow sample: %s\n", ms_last_error());
    for (size_t k = 0; k < tr.n; k++) { free((void *)tr.e[k].name); free((void *)tr.e[k].f32); }
    free(tr.e);
    free(meta);
    regional_list_free(&rl);
    regional_concepts_free(&rc);
    edlora_prompt_free(&ep);
    edlora_free(&ef);
    if (ki.data) ms_image_free(&ki);
    if (si.data) ms_image_free(&si);
    if (have_ka) ms_param_table_free(&kat);
    if (have_sa) ms_param_table_free(&sat);
    if (have_tok) clip_tokenizer_free(&tok);
    if (have_m) ms_model_free(&m);
    ms_free_aligned(image); ms_free_aligned(kc); ms_free_aligned(sc);
    free(px);
    return s ? 1 : 0;
}

/* os.makedirs(path, exist_ok=True): every prefix is created (errors ignored), then the folder
 * must take a file. */
static MsStatus rg_mkdirs(const char *path) {
    char b[4400], probe[4500];
    size_t n = strlen(path);
    if (n >= sizeof b) return ms_errorf(MS_ERR_ARG, "%s: path too long", path);
    memcpy(b, path, n + 1);
    for (size_t i = 1; i <= n; i++)
        if (b[i] == '/' || b[i] == 0) {
            char c = b[i];
            b[i] = 0;
            (void)rg_make_dir(b);
            b[i] = c;
        }
    snprintf(probe, sizeof probe, "%s/.mixshow-probe", path);
    FILE *f = fopen(probe, "wb");
    if (!f) return ms_errorf(MS_ERR_IO, "%s: cannot create the folder", path);
    fclose(f);
    remove(probe);
    return MS_OK;
}
