/* tools/fuzz_safetensors.c — libFuzzer entry point for the safetensors reader (`make fuzz`).
 * Parses the input as a file image; when it is accepted, converts every tensor to float and
 * writes the file back, which must parse again to the same tensors. */
#include "tools/tools.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    StFile f, g;
    if (st_open_memory(&f, data, size, "fuzz") != MS_OK) return 0;
    StEntry *e = (StEntry *)calloc(f.count ? f.count : 1, sizeof *e);
    const char **meta = (const char **)calloc(2 * f.meta_count + 1, sizeof *meta);
    for (size_t i = 0; i < f.count && e; i++) {
        const StTensor *t = &f.tensors[i];
        float *x = (float *)malloc(t->numel ? t->numel * sizeof(float) : 1);
        if (x) st_to_f32(&f, t, x, t->numel);                    /* F8 may refuse: fine */
        free(x);
        e[i].name = t->name; e[i].dtype = t->dtype; e[i].ndim = t->ndim;
        memcpy(e[i].shape, t->shape, sizeof e[i].shape);
        e[i].raw = t->data;                 /* file bytes: host order only on little-endian hosts */
    }
    for (size_t i = 0; i < f.meta_count && meta; i++) { meta[2 * i] = f.meta_keys[i]; meta[2 * i + 1] = f.meta_vals[i]; }
    unsigned char *img = NULL;
    size_t n = 0;
    if (e && meta && st_write_memory(e, f.count, meta, f.meta_count, &img, &n) == MS_OK) {
        if (st_open_memory(&g, img, n, "fuzz-rewritten") != MS_OK || g.count != f.count) abort();
        for (size_t i = 0; i < g.count; i++) {
            const StTensor *a = st_find(&f, g.tensors[i].name), *b = &g.tensors[i];
            if (!a || a->nbytes != b->nbytes || (a->nbytes && memcmp(a->data, b->data, a->nbytes))) abort();
        }
        st_close(&g);
    }
    free(img); free(e); free(meta);
    st_close(&f);
    return 0;
}
