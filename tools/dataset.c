/* tools/dataset.c — the official ED-LoRA training data (Mix-of-Show 51270fd
 * mixofshow/data/lora_dataset.py LoraDataset) and the loop that reads it (train_edlora.py:
 * torch 1.13 DataLoader(shuffle=True, drop_last=True), num_workers 0, optionally wrapped by
 * accelerate's DataLoaderShard), in one process:
 *   - the concept list is read and every instance_data_dir listed in readdir order (Python's
 *     Path.iterdir is os.scandir: readdir order); the whole list is random.shuffle'd once;
 *   - item i is list[i % n] run through instance_transform (tools/transforms.c);
 *   - each epoch draws the iterator's base seed and RandomSampler's seed from the torch global
 *     generator and visits torch.randperm(n) (on a private generator) in batches.
 * Images are decoded and checked once when the dataset opens (the official code opens them at
 * each item: same pixels) and kept in memory. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* opendir/readdir/stat: in the guarded section below */
#endif
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- torch draws of the DataLoader (ATen CPU, torch 1.13) ---- */
/* random_() on an int64 tensor: uniform_int_distribution<int64_t> = random64() % (2^63). */
uint64_t ms_torch_random_int64(MsTorchRng *g) {
    return ms_torch_random64(g) % ((uint64_t)1 << 63);
}

/* randperm_cpu: r = 0..n-1; for i < n-1: z = random() % (n - i); swap r[i], r[i + z]. */
void ms_torch_randperm(MsTorchRng *g, int64_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = i;
    for (int64_t i = 0; i + 1 < n; i++) {
        int64_t z = (int64_t)(ms_torch_random(g) % (uint64_t)(n - i));
        int64_t sav = out[i];
        out[i] = out[z + i];
        out[z + i] = sav;
    }
}

/* ---- directory listing and files: the one platform-specific section ---- */
typedef struct { char **names; size_t n, cap; } NameList;

static void names_free(NameList *l) {
    for (size_t i = 0; i < l->n; i++) free(l->names[i]);
    free(l->names);
    memset(l, 0, sizeof *l);
}

static char *dup_str(const char *s) {
    size_t n = strlen(s);
    char *r = (char *)malloc(n + 1);
    if (r) memcpy(r, s, n + 1);
    return r;
}

static MsStatus names_push(NameList *l, const char *name) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        char **p = (char **)realloc(l->names, cap * sizeof *p);
        if (!p) return ms_errorf(MS_ERR_NOMEM, "listing: out of memory");
        l->names = p; l->cap = cap;
    }
    if (!(l->names[l->n] = dup_str(name))) return ms_errorf(MS_ERR_NOMEM, "listing: out of memory");
    l->n++;
    return MS_OK;
}

static char *path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    int sep = a > 0 && dir[a - 1] != '/'
#if defined(_WIN32)
              && dir[a - 1] != '\\'
#endif
        ;
    char *r = (char *)malloc(a + b + 2);
    if (!r) return NULL;
    memcpy(r, dir, a);
    if (sep) r[a++] = '/';
    memcpy(r + a, name, b + 1);
    return r;
}

#if !defined(_WIN32)
#include <dirent.h>
#include <sys/stat.h>
static int path_kind(const char *p) {           /* 0 missing, 1 regular file (symlinks followed), 2 other */
    struct stat st;
    if (stat(p, &st) != 0) return 0;
    return S_ISREG(st.st_mode) ? 1 : 2;
}
/* Names in `dir` in readdir order (os.scandir order), without "." and "..". */
static MsStatus list_dir(const char *dir, NameList *out) {
    DIR *d = opendir(dir);
    struct dirent *e;
    if (!d) return ms_errorf(MS_ERR_IO, "%s: cannot open the folder (instance_data_dir)", dir);
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        MsStatus st = names_push(out, e->d_name);
        if (st != MS_OK) { closedir(d); return st; }
    }
    closedir(d);
    return MS_OK;
}
#else
#include <windows.h>
static int path_kind(const char *p) {
    DWORD a = GetFileAttributesA(p);
    if (a == INVALID_FILE_ATTRIBUTES) return 0;
    return (a & FILE_ATTRIBUTE_DIRECTORY) ? 2 : 1;
}
static MsStatus list_dir(const char *dir, NameList *out) {   /* FindFirstFile order (os.scandir's) */
    WIN32_FIND_DATAA fd;
    char *pat = path_join(dir, "*");
    if (!pat) return ms_errorf(MS_ERR_NOMEM, "listing: out of memory");
    HANDLE h = FindFirstFileA(pat, &fd);
    free(pat);
    if (h == INVALID_HANDLE_VALUE) return ms_errorf(MS_ERR_IO, "%s: cannot open the folder (instance_data_dir)", dir);
    do {
        if (!strcmp(fd.cFileName, ".") || !strcmp(fd.cFileName, "..")) continue;
        MsStatus st = names_push(out, fd.cFileName);
        if (st != MS_OK) { FindClose(h); return st; }
    } while (FindNextFileA(h, &fd));
    FindClose(h);
    return MS_OK;
}
#endif

/* The names in dir (readdir order) for other tools: *names malloc'ed, each name too. */
MsStatus ms_list_dir(const char *dir, char ***names, size_t *n) {
    NameList l = { 0 };
    MsStatus s = list_dir(dir, &l);
    if (s) { names_free(&l); return s; }
    *names = l.names;
    *n = l.n;
    return MS_OK;
}

static MsStatus read_file(const char *path, uint8_t **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    size_t cap = 1 << 16, n = 0;
    uint8_t *b = (uint8_t *)malloc(cap);
    if (!f || !b) { if (f) fclose(f); free(b); return f ? ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path) : ms_errorf(MS_ERR_IO, "%s: cannot open", path); }
    for (;;) {
        if (n == cap) {
            uint8_t *p = cap < ((size_t)1 << 30) ? (uint8_t *)realloc(b, cap * 2) : NULL;
            if (!p) { fclose(f); free(b); return ms_errorf(MS_ERR_NOMEM, "%s: file too large or out of memory", path); }
            b = p; cap *= 2;
        }
        size_t k = fread(b + n, 1, cap - n, f);
        n += k;
        if (k == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) { free(b); return ms_errorf(MS_ERR_IO, "%s: read error", path); }
    *buf = b; *len = n;
    return MS_OK;
}

/* PIL Image.open(path).convert(want == 3 ? 'RGB' : 'L'), 8-bit. Pillow opens 16-bit grey PNGs
 * as mode 'I' and converts I -> RGB / L by clipping to 0..255 (Convert.c i2rgb, i2l), not by
 * taking the high byte; other 16-bit PNGs become 8-bit by their high byte. */
static MsStatus load_pil(const char *path, int want, MsImage *img) {
    uint8_t *buf;
    size_t len;
    MsStatus st = read_file(path, &buf, &len);
    if (st != MS_OK) return st;
    int grey16 = len > 26 && !memcmp(buf, "\x89PNG\r\n\x1a\n", 8) && buf[24] == 16 && buf[25] == 0;
    if (grey16) {
        MsImage g;
        st = ms_png_decode(buf, len, path, 1, 16, &g);
        if (st == MS_OK) {
            size_t n = (size_t)g.w * g.h;
            uint8_t *o = (uint8_t *)malloc(n * want);
            if (!o) { ms_image_free(&g); free(buf); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
            for (size_t i = 0; i < n; i++) {
                uint16_t v = ((const uint16_t *)g.data)[i];
                for (int c = 0; c < want; c++) o[i * want + c] = v >= 255 ? 255 : (uint8_t)v;
            }
            free(g.data);
            g.data = o; g.channels = want; g.depth = 8;
            *img = g;
        }
    } else {
        st = ms_image_decode(buf, len, path, want, img);
    }
    free(buf);
    return st;
}

/* ---- the dataset ---- */
typedef struct {
    char *image, *prompt, *mask;     /* mask NULL: none */
    uint8_t *rgb, *mask_l;           /* decoded (h, w, 3) and (h, w) */
    int w, h;
} TrainItem;

struct TrainDataset {
    TrainDataConfig cfg;
    TrainItem *items;
    size_t n, cap;
    int size;                        /* S of the resize transform */
};

/* os.path.splitext(name)[0]: the last '.' that follows a non-dot character. */
static char *splitext_root(const char *name) {
    const char *dot = strrchr(name, '.');
    size_t n = strlen(name);
    if (dot) {
        const char *p = name;
        while (p < dot && *p == '.') p++;
        if (p < dot) n = (size_t)(dot - name);
    }
    char *r = (char *)malloc(n + 1);
    if (!r) return NULL;
    memcpy(r, name, n);
    r[n] = 0;
    return r;
}

static int valid_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) { k = 1; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { k = 2; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { k = 3; cp = c & 0x07; }
        else return 0;
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if ((k == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* open(caption_path).readlines()[0]: the file must be UTF-8 (Python decodes all of it); the
 * first line ends at '\n' or '\r' (universal newlines). */
static MsStatus read_caption(const char *path, char **line) {
    uint8_t *buf;
    size_t len, e = 0;
    MsStatus st = read_file(path, &buf, &len);
    if (st != MS_OK) return st;
    if (!valid_utf8(buf, len)) { free(buf); return ms_errorf(MS_ERR_FORMAT, "%s: caption is not valid UTF-8", path); }
    if (len == 0) { free(buf); return ms_errorf(MS_ERR_FORMAT, "%s: caption file is empty (the official code fails: readlines()[0])", path); }
    if (memchr(buf, 0, len)) { free(buf); return ms_errorf(MS_ERR_FORMAT, "%s: caption holds a NUL byte", path); }
    while (e < len && buf[e] != '\n' && buf[e] != '\r') e++;
    *line = (char *)malloc(e + 1);
    if (!*line) { free(buf); return ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path); }
    memcpy(*line, buf, e);
    (*line)[e] = 0;
    free(buf);
    return MS_OK;
}

/* A concept-list path: as given (relative to the current directory, as the official code),
 * else relative to base_dir. Returns a malloc'ed path. */
static char *resolve_path(const char *p, const char *base_dir) {
    if (path_kind(p) || !base_dir || !*base_dir || p[0] == '/') return dup_str(p);
    char *q = path_join(base_dir, p);
    if (q && path_kind(q)) return q;
    free(q);
    return dup_str(p);
}

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void item_free(TrainItem *it) {
    free(it->image); free(it->prompt); free(it->mask); free(it->rgb); free(it->mask_l);
    memset(it, 0, sizeof *it);
}

void train_dataset_close(TrainDataset *d) {
    if (!d) return;
    for (size_t i = 0; i < d->n; i++) item_free(&d->items[i]);
    free(d->items);
    free(d);
}

/* Reads one concept: lists its folder and appends its images (decoded and checked). */
static MsStatus add_concept(TrainDataset *d, const JsonValue *cj, const TrainDatasetOptions *opt, const char *list_path) {
    const TrainDataConfig *c = &d->cfg;
    const char *prompt_raw, *dir_raw;
    const JsonValue *v;
    MsStatus st = json_need_string(cj, "instance_prompt", &prompt_raw);
    if (st == MS_OK) st = json_need_string(cj, "instance_data_dir", &dir_raw);
    if (st != MS_OK) return st;
    const char *base = opt ? opt->base_dir : NULL;
    char *dir = resolve_path(dir_raw, base), *caption_dir = NULL, *mask_dir = NULL;
    char *prompt = train_process_text(prompt_raw, c->n_replace, c->replace_from, c->replace_to);
    if ((v = json_get(cj, "caption_dir")) && v->type != JSON_NULL) {
        if (v->type != JSON_STRING) st = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: caption_dir: expected a string", list_path, v->line, v->col);
        else caption_dir = resolve_path(v->str, base);
    }
    if (st == MS_OK && (v = json_get(cj, "mask_dir")) && v->type != JSON_NULL) {
        if (v->type != JSON_STRING) st = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: mask_dir: expected a string", list_path, v->line, v->col);
        else mask_dir = resolve_path(v->str, base);
    }
    NameList names = { 0 };
    size_t added = 0;
    if (st == MS_OK && (!dir || !prompt)) st = ms_errorf(MS_ERR_NOMEM, "concept list: out of memory");
    if (st == MS_OK) st = list_dir(dir, &names);
    if (st == MS_OK && opt && opt->sort_names) qsort(names.names, names.n, sizeof *names.names, cmp_names);
    for (size_t i = 0; st == MS_OK && i < names.n; i++) {
        TrainItem it;
        char *root = NULL;
        memset(&it, 0, sizeof it);
        if (!strcmp(names.names[i], ".DS_Store")) continue;
        it.image = path_join(dir, names.names[i]);
        if (!it.image) { st = ms_errorf(MS_ERR_NOMEM, "listing: out of memory"); break; }
        if (path_kind(it.image) != 1) { free(it.image); continue; }     /* x.is_file() */
        root = splitext_root(names.names[i]);
        if (!root) st = ms_errorf(MS_ERR_NOMEM, "listing: out of memory");
        if (st == MS_OK && c->use_caption && caption_dir) {
            size_t rn = strlen(root);
            char *txt = (char *)malloc(rn + 5), *cp = NULL;
            if (txt) { memcpy(txt, root, rn); memcpy(txt + rn, ".txt", 5); cp = path_join(caption_dir, txt); }
            free(txt);
            if (!cp) st = ms_errorf(MS_ERR_NOMEM, "listing: out of memory");
            else if (path_kind(cp)) {                                    /* os.path.exists */
                char *line = NULL;
                st = read_caption(cp, &line);
                if (st == MS_OK) {
                    it.prompt = train_process_text(line, c->n_replace, c->replace_from, c->replace_to);
                    if (!it.prompt) st = ms_errorf(MS_ERR_NOMEM, "caption: out of memory");
                }
                free(line);
            }
            free(cp);
        }
        if (st == MS_OK && !it.prompt && !(it.prompt = dup_str(prompt))) st = ms_errorf(MS_ERR_NOMEM, "out of memory");
        if (st == MS_OK && c->use_mask && mask_dir) {
            size_t rn = strlen(root);
            char *png = (char *)malloc(rn + 5);
            if (png) { memcpy(png, root, rn); memcpy(png + rn, ".png", 5); it.mask = path_join(mask_dir, png); }
            free(png);
            if (!it.mask) st = ms_errorf(MS_ERR_NOMEM, "listing: out of memory");
        }
        free(root);
        if (st == MS_OK) {                                               /* Image.open(..).convert('RGB') */
            MsImage img;
            st = load_pil(it.image, 3, &img);
            if (st == MS_OK) { it.rgb = (uint8_t *)img.data; it.w = img.w; it.h = img.h; }
        }
        if (st == MS_OK && it.mask) {                                    /* .convert('L') */
            MsImage m;
            if (path_kind(it.mask) != 1) st = ms_errorf(MS_ERR_IO, "%s: mask of %s is missing (use_mask: true)", it.mask, it.image);
            else st = load_pil(it.mask, 1, &m);
            if (st == MS_OK) {
                it.mask_l = (uint8_t *)m.data;
                if (m.w != it.w || m.h != it.h)
                    st = ms_errorf(MS_ERR_FORMAT, "%s: mask is %dx%d, its image %s is %dx%d", it.mask, m.w, m.h, it.image, it.w, it.h);
            }
        }
        if (st == MS_OK && d->n == d->cap) {
            size_t cap = d->cap ? d->cap * 2 : 16;
            TrainItem *p = (TrainItem *)realloc(d->items, cap * sizeof *p);
            if (!p) st = ms_errorf(MS_ERR_NOMEM, "dataset: out of memory");
            else { d->items = p; d->cap = cap; }
        }
        if (st != MS_OK) { item_free(&it); break; }
        d->items[d->n++] = it;
        added++;
    }
    if (st == MS_OK && added == 0) st = ms_errorf(MS_ERR_ARG, "%s: no image files in instance_data_dir", dir);
    names_free(&names);
    free(dir); free(caption_dir); free(mask_dir); free(prompt);
    return st;
}

MsStatus train_dataset_open(TrainDataset **out, const TrainDataConfig *c, const TrainDatasetOptions *opt, PyRandom *py) {
    *out = NULL;
    int size = 0, resize_at = -1, tensor_at = -1;
    for (int i = 0; i < c->n_transforms; i++) {
        MsTransformType t = c->transforms[i].type;
        if (t == MS_TF_HUMAN_RESIZE_CROP_V3 || t == MS_TF_RESIZE_FILL_MASK_NEW) {
            if (resize_at >= 0) return ms_errorf(MS_ERR_UNSUPPORTED, "instance_transform: two resize transforms (the official code fails)");
            resize_at = i; size = c->transforms[i].size;
        }
        if (t == MS_TF_TO_TENSOR && tensor_at < 0) tensor_at = i;
        if (t == MS_TF_PAIR_RANDOM_HFLIP && !c->use_mask)
            return ms_errorf(MS_ERR_UNSUPPORTED, "instance_transform: PairRandomHorizontalFlip needs use_mask: true (the official code fails with KeyError 'mask')");
    }
    if (resize_at < 0 || tensor_at < resize_at)
        return ms_errorf(MS_ERR_UNSUPPORTED, "instance_transform: needs HumanResizeCropFinalV3 or ResizeFillMaskNew, then ToTensor "
                         "(LoraDataset needs img_mask and a fixed-size tensor)");
    if (size < 8 || size > 512 || size % 8)
        return ms_errorf(MS_ERR_UNSUPPORTED, "instance_transform: size %d: the official transforms work for sizes up to 512 (multiple of 8)", size);
    if (c->enlarge_ratio < 1) return ms_errorf(MS_ERR_ARG, "dataset_enlarge_ratio %d: expected >= 1", c->enlarge_ratio);
    TrainDataset *d = (TrainDataset *)calloc(1, sizeof *d);
    if (!d) return ms_errorf(MS_ERR_NOMEM, "dataset: out of memory");
    d->cfg = *c;
    d->size = size;
    char *list_path = resolve_path(c->concept_list, opt ? opt->base_dir : NULL);
    JsonValue *j = NULL;
    MsStatus st = list_path ? json_parse_file(list_path, &j) : ms_errorf(MS_ERR_NOMEM, "out of memory");
    if (st == MS_OK && j->type != JSON_ARRAY)
        st = ms_errorf(MS_ERR_FORMAT, "%s: expected a JSON array of concepts, found %s", list_path, json_type_name(j->type));
    if (st == MS_OK && json_len(j) == 0) st = ms_errorf(MS_ERR_FORMAT, "%s: the concept list is empty", list_path);
    for (size_t i = 0; st == MS_OK && i < json_len(j); i++) {
        const JsonValue *cj = json_at(j, i);
        if (cj->type != JSON_OBJECT) st = ms_errorf(MS_ERR_FORMAT, "%s:%d:%d: concept %zu: expected an object", list_path, cj->line, cj->col, i);
        else st = add_concept(d, cj, opt, list_path);
    }
    json_free(j);
    free(list_path);
    if (st != MS_OK) { train_dataset_close(d); return st; }
    py_random_shuffle(py, d->items, d->n, sizeof *d->items);          /* random.shuffle(self.instance_images_path) */
    *out = d;
    return MS_OK;
}

size_t train_dataset_n_images(const TrainDataset *d) { return d->n; }
size_t train_dataset_len(const TrainDataset *d) { return d->n * (size_t)d->cfg.enlarge_ratio; }
int train_dataset_size(const TrainDataset *d) { return d->size; }
int train_dataset_has_masks(const TrainDataset *d) { return d->cfg.use_mask && d->n && d->items[0].mask != NULL; }
const char *train_dataset_image_path(const TrainDataset *d, size_t i) { return i < d->n ? d->items[i].image : NULL; }
const char *train_dataset_prompt(const TrainDataset *d, size_t i) { return i < d->n ? d->items[i].prompt : NULL; }
const char *train_dataset_mask_path(const TrainDataset *d, size_t i) { return i < d->n ? d->items[i].mask : NULL; }

MsStatus train_dataset_get(TrainDataset *d, size_t index, PyRandom *py, MsTorchRng *g,
                           float *image, double *mask, double *img_mask, char **prompt) {
    if (index >= train_dataset_len(d)) return ms_errorf(MS_ERR_ARG, "dataset index %zu out of range (len %zu)", index, train_dataset_len(d));
    const TrainItem *it = &d->items[index % d->n];
    TrainSample s;
    int S = d->size, m8 = S / 8;
    MsStatus st = train_sample_init(&s, it->rgb, it->w, it->h, it->mask_l, it->prompt);
    if (st == MS_OK) st = train_transforms_run(d->cfg.transforms, d->cfg.n_transforms, &s, py, g);
    if (st == MS_OK && (!s.tensor || s.w != S || s.h != S || !s.placed || s.mw != m8 || s.mh != m8))
        st = ms_errorf(MS_ERR_UNSUPPORTED, "%s: instance_transform gave no (3,%d,%d) tensor", it->image, S, S);
    if (st != MS_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ms_last_error());
        train_sample_free(&s);
        return ms_errorf(st, "%s: %s", it->image, msg);
    }
    size_t nm = (size_t)m8 * m8;
    memcpy(image, s.tensor, (size_t)3 * S * S * sizeof *image);
    if (mask) { if (s.mask) memcpy(mask, s.mask, nm * sizeof *mask); else memset(mask, 0, nm * sizeof *mask); }
    memcpy(img_mask, s.img_mask, nm * sizeof *img_mask);
    if (prompt) { *prompt = s.prompt; s.prompt = NULL; }
    train_sample_free(&s);
    return MS_OK;
}

/* ---- the DataLoader ---- */
MsStatus train_loader_init(TrainLoader *l, const TrainDataset *d, size_t batch_size, int lookahead) {
    memset(l, 0, sizeof *l);
    l->n = train_dataset_len(d);
    l->batch_size = batch_size;
    l->lookahead = lookahead;
    if (batch_size < 1 || l->n < batch_size)
        return ms_errorf(MS_ERR_ARG, "batch_size %zu with %zu items (drop_last): no batch at all (the official loop then "
                         "never yields)", batch_size, l->n);
    l->img_numel = (size_t)3 * d->size * d->size;
    l->mask_numel = (size_t)(d->size / 8) * (d->size / 8);
    l->perm = (int64_t *)malloc(l->n * sizeof *l->perm);
    if (lookahead) {
        l->p_images = (float *)malloc(batch_size * l->img_numel * sizeof *l->p_images);
        l->p_masks = (double *)malloc(batch_size * l->mask_numel * sizeof *l->p_masks);
        l->p_img_masks = (double *)malloc(batch_size * l->mask_numel * sizeof *l->p_img_masks);
        l->p_prompts = (char **)calloc(batch_size, sizeof *l->p_prompts);
        l->p_indices = (size_t *)malloc(batch_size * sizeof *l->p_indices);
    }
    if (!l->perm || (lookahead && (!l->p_images || !l->p_masks || !l->p_img_masks || !l->p_prompts || !l->p_indices))) {
        train_loader_free(l);
        return ms_errorf(MS_ERR_NOMEM, "data loader: out of memory");
    }
    return MS_OK;
}

void train_loader_free(TrainLoader *l) {
    if (l->p_prompts) for (size_t i = 0; i < l->batch_size; i++) free(l->p_prompts[i]);
    free(l->perm); free(l->p_images); free(l->p_masks); free(l->p_img_masks); free(l->p_prompts); free(l->p_indices);
    memset(l, 0, sizeof *l);
}

/* iter(loader) and the first next(): base seed, then the sampler's seed and permutation. */
static void start_epoch(TrainLoader *l, MsTorchRng *g) {
    MsTorchRng priv;
    l->base_seed = ms_torch_random_int64(g);
    l->sampler_seed = ms_torch_random_int64(g);
    ms_torch_seed(&priv, l->sampler_seed);
    ms_torch_randperm(&priv, l->perm, (int64_t)l->n);
    l->epoch++;
    l->next_batch = 0;
    l->in_epoch = 1;
}

static MsStatus fetch_batch(TrainLoader *l, TrainDataset *d, PyRandom *py, MsTorchRng *g, float *images,
                            double *masks, double *img_masks, char **prompts, size_t *indices) {
    for (size_t b = 0; b < l->batch_size; b++) {
        size_t idx = (size_t)l->perm[l->next_batch * l->batch_size + b];
        MsStatus st = train_dataset_get(d, idx, py, g, images + b * l->img_numel, masks ? masks + b * l->mask_numel : NULL,
                                        img_masks + b * l->mask_numel, &prompts[b]);
        if (st != MS_OK) { while (b > 0) { b--; free(prompts[b]); prompts[b] = NULL; } return st; }
        if (indices) indices[b] = idx;
    }
    l->next_batch++;
    return MS_OK;
}

MsStatus train_loader_next(TrainLoader *l, TrainDataset *d, PyRandom *py, MsTorchRng *g, float *images,
                           double *masks, double *img_masks, char **prompts, size_t *indices) {
    size_t n_batches = l->n / l->batch_size, B = l->batch_size;
    MsStatus st;
    if (!l->lookahead) {
        if (!l->in_epoch || l->next_batch >= n_batches) start_epoch(l, g);
        return fetch_batch(l, d, py, g, images, masks, img_masks, prompts, indices);
    }
    /* accelerate DataLoaderShard: batch k+1 is fetched before batch k is handed out */
    if (!l->have_pending) {
        start_epoch(l, g);
        st = fetch_batch(l, d, py, g, l->p_images, l->p_masks, l->p_img_masks, l->p_prompts, l->p_indices);
        if (st != MS_OK) return st;
        l->have_pending = 1;
    }
    memcpy(images, l->p_images, B * l->img_numel * sizeof *images);
    if (masks) memcpy(masks, l->p_masks, B * l->mask_numel * sizeof *masks);
    memcpy(img_masks, l->p_img_masks, B * l->mask_numel * sizeof *img_masks);
    for (size_t b = 0; b < B; b++) { prompts[b] = l->p_prompts[b]; l->p_prompts[b] = NULL; }
    if (indices) memcpy(indices, l->p_indices, B * sizeof *indices);
    l->have_pending = 0;
    if (l->next_batch < n_batches) {
        st = fetch_batch(l, d, py, g, l->p_images, l->p_masks, l->p_img_masks, l->p_prompts, l->p_indices);
        if (st != MS_OK) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", ms_last_error());
            for (size_t b = 0; b < B; b++) { free(prompts[b]); prompts[b] = NULL; }
            return ms_errorf(st, "%s", msg);
        }
        l->have_pending = 1;
    }
    return MS_OK;
}
