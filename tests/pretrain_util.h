/* tests/pretrain_util.h — what the pretrain tests (test_pretrain, test_pretrain_vae,
 * test_pretrain_adapter) share: `mixshow pretrain` with a test's flags, a stage's loss csv, two
 * tables compared bitwise, the tiny UNet + text encoder, and a sample drawn from a written model.
 * Header-only like test.h (static inline: a test that uses a part only compiles clean). */
#ifndef MS_PRETRAIN_UTIL_H
#define MS_PRETRAIN_UTIL_H

#include "test.h"

#include "tools/tools.h"

/* mixshow pretrain FLAGS --out dir OPTS [e0 e1 e2 e3] (the NULL ones left out) */
static inline int pretrain_run(const char *const *flags, int nflags, const char *dir, const char *const *opts, int nopts,
                               const char *e0, const char *e1, const char *e2, const char *e3) {
    char *argv[96];
    const char *e[4] = { e0, e1, e2, e3 };
    int n = 0;
    if (nflags + nopts + 8 > (int)(sizeof argv / sizeof argv[0])) return -1;
    argv[n++] = "pretrain";
    for (int i = 0; i < nflags; i++) argv[n++] = (char *)flags[i];
    argv[n++] = "--out"; argv[n++] = (char *)dir;
    for (int i = 0; i < nopts; i++) argv[n++] = (char *)opts[i];
    for (int i = 0; i < 4; i++) if (e[i]) argv[n++] = (char *)e[i];
    argv[n] = NULL;
    return cmd_pretrain(n, argv);
}

/* dir/file (a stage's csv, "step,loss,...") -> loss[step - 1]; returns the rows read */
static inline int read_losses(const char *dir, const char *file, double *loss, int cap) {
    char path[700], line[512];
    int n = 0;
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        long long k;
        double l;
        if (sscanf(line, "%lld,%lf", &k, &l) == 2 && k >= 1 && k <= cap) { loss[k - 1] = l; n++; }
    }
    fclose(f);
    return n;
}

/* copies of a trainer's AdamW moments (m, v: n floats each) before a step, to redo it by hand */
static inline void moments_copy(const float *mm, const float *vv, size_t n, float **m0, float **v0) {
    *m0 = (float *)malloc(n * sizeof(float));
    *v0 = (float *)malloc(n * sizeof(float));
    if (*m0) memcpy(*m0, mm, n * sizeof(float));
    if (*v0) memcpy(*v0, vv, n * sizeof(float));
}

/* every parameter of a == b's bitwise (buffers skipped); else the first differing name into *bad
 * (bad may be NULL) */
static inline int tables_equal(const MsParamTable *a, const MsParamTable *b, const char **bad) {
    if (a->n != b->n) { if (bad) *bad = "(tensor count)"; return 0; }
    for (int i = 0; i < a->n; i++) {
        if (a->p[i].flags & MS_PARAM_BUFFER) continue;
        if (!a->p[i].f32 || !b->p[i].f32 || a->p[i].numel != b->p[i].numel ||
            memcmp(a->p[i].f32, b->p[i].f32, a->p[i].numel * sizeof(float))) {
            if (bad) *bad = a->p[i].name;
            return 0;
        }
    }
    return 1;
}

/* ---- the tiny model: UNet 8/16 channels, 1 layer, 2 heads, 4 groups, cross-attention 16;
 * text encoder width 16, 1 layer, 2 heads, the real CLIP tokenizer; weights drawn from seed 11 ---- */
typedef struct {
    MsModel m;
    ClipTokenizer tok;
    AdapterConfig ac;                   /* test_pretrain_adapter's adapter (tiny_model leaves it zero) */
    int ok;
} Tiny;

/* attn_first 0: DownBlock2D + CrossAttnDownBlock2D; 1: SD's order, CrossAttnDownBlock2D first */
static inline void tiny_unet_cfg(UNetConfig *c, int attn_first) {
    ms_unet_config_sd15(c);
    c->sample_size = 8; c->n_blocks = 2;
    c->down_block_types[attn_first ? 1 : 0] = MS_BLOCK_DOWN; c->down_block_types[attn_first ? 0 : 1] = MS_BLOCK_CROSS_ATTN_DOWN;
    c->up_block_types[attn_first ? 1 : 0] = MS_BLOCK_CROSS_ATTN_UP; c->up_block_types[attn_first ? 0 : 1] = MS_BLOCK_UP;
    c->block_out_channels[0] = 8; c->block_out_channels[1] = 16;
    c->attention_head_dim[0] = c->attention_head_dim[1] = 2;
    c->layers_per_block = 1; c->norm_num_groups = 4; c->cross_attention_dim = 16;
}

static inline int tiny_model(Tiny *t, int attn_first) {
    char tokdir[1024];
    int shipped;
    memset(t, 0, sizeof *t);
    ClipTextConfig *x = &t->m.text_config;
    tiny_unet_cfg(&t->m.unet_config, attn_first);
    ms_clip_text_config_sd15(x);
    x->hidden_size = 16; x->intermediate_size = 64; x->num_hidden_layers = 1; x->num_attention_heads = 2;
    ms_scheduler_config_sd15(&t->m.scheduler_config);
    ms_vae_config_sd15(&t->m.vae_config);
    MsTorchRng g;
    ms_torch_seed(&g, 11);
    if (!check(ms_param_table_unet(&t->m.unet_config, &t->m.unet) == MS_OK && ms_param_table_alloc(&t->m.unet, NULL) == MS_OK &&
               ms_param_table_text(x, &t->m.text) == MS_OK && ms_param_table_alloc(&t->m.text, NULL) == MS_OK &&
               ms_pretrain_init_weights(&t->m.unet, &g) == MS_OK && ms_pretrain_init_weights(&t->m.text, &g) == MS_OK,
               "tiny tables: %s", ms_last_error()))
        return 0;
    if (!check(ms_find_tokenizer(NULL, NULL, tokdir, sizeof tokdir, &shipped) == MS_OK &&
               ms_clip_tokenizer_load(tokdir, &t->tok) == MS_OK, "tokenizer: %s", ms_last_error()))
        return 0;
    t->ok = 1;
    return 1;
}

static inline void tiny_free(Tiny *t) {
    if (t->ok) clip_tokenizer_free(&t->tok);
    ms_model_free(&t->m);
}

/* `mixshow sample --model model` (steps steps, seed 1) writes png, a 64x64 image; what names the
 * model in the messages */
static inline void check_sample_64(const char *model, const char *what, const char *png, const char *steps) {
    char *argv[] = { "sample", "--model", (char *)model, "-p", "a red circle above a blue square", "--steps", (char *)steps,
                     "--seed", "1", "-o", (char *)png };
    const int rc = cmd_sample((int)(sizeof argv / sizeof argv[0]), argv);
    MsImage img;
    if (check(rc == 0, "mixshow sample --model %s: exit status %d", what, rc) &&
        check(ms_image_read(png, 3, &img) == MS_OK, "read %s: %s", png, ms_last_error())) {
        check(img.w == 64 && img.h == 64, "sampled image 64x64 (got %dx%d)", img.w, img.h);
        ms_image_free(&img);
    }
}

#endif /* MS_PRETRAIN_UTIL_H */
