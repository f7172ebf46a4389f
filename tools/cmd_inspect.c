/* tools/cmd_inspect.c — `mixshow inspect FILE [--json]`: every tensor of a .safetensors file
 * or a torch.save zip (.pth/.ckpt/.bin) with its dtype and shape, plus the safetensors
 * __metadata__ or the pickle's object tree. Reads headers only (no tensor data). */
#include "tools/tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void put_json_str(const char *s) {
    JsonBuf b = { NULL, 0, 0 };
    if (json_write_string(&b, s, strlen(s)) == MS_OK) fputs(b.data, stdout);
    jbuf_free(&b);
}

static void put_shape(int json, int ndim, const int64_t *shape) {
    printf("[");
    for (int i = 0; i < ndim; i++) printf("%s%lld", i ? (json ? "," : ", ") : "", (long long)shape[i]);
    printf("]");
}

/* one tensor: "name<TAB>dtype<TAB>[shape]" (the layout of the shared key lists) or a JSON object */
static void put_tensor(int json, int first, const char *name, const char *dtype, int ndim, const int64_t *shape,
                       int requires_grad) {
    if (!json) {
        printf("%s\t%s\t", name, dtype);
        put_shape(0, ndim, shape);
        printf("%s\n", requires_grad ? "\trequires_grad" : "");
        return;
    }
    printf("%s\n    {\"name\": ", first ? "" : ",");
    put_json_str(name);
    printf(", \"dtype\": \"%s\", \"shape\": ", dtype);
    put_shape(1, ndim, shape);
    if (requires_grad) printf(", \"requires_grad\": true");
    printf("}");
}

static size_t numel_of(int ndim, const int64_t *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    return n;
}

static int inspect_st(const char *path, int json) {
    StFile f;
    size_t total = 0;
    if (st_open(&f, path)) { fprintf(stderr, "mixshow inspect: %s\n", ms_last_error()); st_close(&f); return 1; }
    if (json) {
        printf("{\"file\": ");
        put_json_str(path);
        printf(", \"format\": \"safetensors\", \"metadata\": {");
        for (size_t i = 0; i < f.meta_count; i++) {
            printf("%s", i ? ", " : "");
            put_json_str(f.meta_keys[i]);
            printf(": ");
            put_json_str(f.meta_vals[i]);
        }
        printf("},\n  \"tensors\": [");
    } else {
        printf("# %s: safetensors, %zu tensors\n", path, f.count);
        for (size_t i = 0; i < f.meta_count; i++) printf("# __metadata__ %s = %s\n", f.meta_keys[i], f.meta_vals[i]);
    }
    for (size_t i = 0; i < f.count; i++) {
        const StTensor *t = &f.tensors[i];
        put_tensor(json, i == 0, t->name, st_dtype_name(t->dtype), t->ndim, t->shape, 0);
        total += t->numel;
    }
    if (json) printf("\n  ], \"count\": %zu, \"numel\": %zu}\n", f.count, total);
    else printf("# %zu tensors, %zu values\n", f.count, total);
    st_close(&f);
    return 0;
}

static int inspect_pth(const char *path, int json) {
    PthFile f;
    size_t total = 0;
    memset(&f, 0, sizeof f);
    if (pth_open(&f, path)) { fprintf(stderr, "mixshow inspect: %s\n", ms_last_error()); pth_close(&f); return 1; }
    if (json) {
        printf("{\"file\": ");
        put_json_str(path);
        printf(", \"format\": \"pytorch\", \"structure\": ");
        put_json_str(f.summary ? f.summary : "");
        printf(",\n  \"tensors\": [");
    } else {
        printf("# %s: PyTorch zip pickle, %zu tensors\n# structure:\n", path, f.n);
        const char *s = f.summary ? f.summary : "";
        while (*s) {                                   /* the tree, one comment line per node */
            const char *e = strchr(s, '\n');
            size_t len = e ? (size_t)(e - s) : strlen(s);
            printf("#   %.*s\n", (int)len, s);
            s += len + (e ? 1 : 0);
        }
    }
    for (size_t i = 0; i < f.n; i++) {
        const PthTensor *t = &f.t[i];
        put_tensor(json, i == 0, t->name, pth_dtype_name(t->dtype), t->ndim, t->shape, t->requires_grad);
        total += numel_of(t->ndim, t->shape);
    }
    if (json) printf("\n  ], \"count\": %zu, \"numel\": %zu}\n", f.n, total);
    else printf("# %zu tensors, %zu values\n", f.n, total);
    pth_close(&f);
    return 0;
}

int cmd_inspect(int argc, char **argv) {
    const char *path = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: mixshow inspect FILE [--json]\n"
                   "  Lists every tensor (name, dtype, shape) of a .safetensors file or a PyTorch\n"
                   "  checkpoint (.pth/.ckpt/.bin, torch.save zip format), with the safetensors\n"
                   "  __metadata__ or the pickle's object tree. Text output uses the layout\n"
                   "  name<TAB>dtype<TAB>[shape]; --json writes one JSON object.\n");
            return 0;
        } else if (!path) path = argv[i];
        else { fprintf(stderr, "mixshow inspect: unexpected argument '%s'\n", argv[i]); return 2; }
    }
    if (!path) { fprintf(stderr, "usage: mixshow inspect FILE [--json]\n"); return 2; }
    unsigned char head[2] = { 0, 0 };
    FILE *fp = fopen(path, "rb");
    if (!fp) { fprintf(stderr, "mixshow inspect: %s: cannot open\n", path); return 1; }
    size_t got = fread(head, 1, 2, fp);
    fclose(fp);
    if (got == 2 && head[0] == 'P' && head[1] == 'K') return inspect_pth(path, json);
    return inspect_st(path, json);
}
