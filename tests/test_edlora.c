/* tests/test_edlora.c — ED-LoRA files (tools/edlora.c) and ED-LoRA sampling (ms_txt2img's
 * ED-LoRA fields, `mixshow sample --edlora`) against tests/data/edlora/ (tools/ref/
 * gen_edlora_golden.py: Mix-of-Show's convert_edlora, EDLoRA_AttnProcessor and
 * EDLoRAPipeline._encode_prompt on diffusers 0.19.3 modules):
 *   - the official .pth reads; its dict order is the order edlora_from_lora writes
 *   - .pth and .safetensors round trips (write, read back, equal, same order)
 *   - the ED-LoRA run (16 bound prompts, layer-wise contexts) and the plain LoRA run: latents
 *     after every step (rel L2 <= 1e-4), decoded image (1e-4), pixels (max diff 1)
 *   - `mixshow sample --edlora FILE:ALPHA` writes the golden pixels
 *   - bad files and bad combinations fail with a message naming the key */
#include "tests/test.h"
#include "tools/tools.h"

#include <time.h>

#define MODEL "models/tiny-sd"
#define DIR "tests/data/edlora/"

static StFile G;

static const char *tmp_path(const char *suffix) {
    static char buf[4][512];
    static unsigned counter;
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = getenv("TEMP");
    if (!dir || !*dir) dir = "/tmp";
    char *b = buf[counter % 4];
    snprintf(b, sizeof buf[0], "%s/mixshow_test_edlora_%lu_%lu_%u%s", dir, (unsigned long)time(NULL),
             (unsigned long)(clock() & 0xffffff), counter, suffix);
    counter++;
    return b;
}

static int same_modules(const EdloraModule *a, int na, const EdloraModule *b, int nb) {
    if (na != nb) return 0;
    for (int i = 0; i < na; i++) {
        if (strcmp(a[i].name, b[i].name) || a[i].rank != b[i].rank || a[i].in != b[i].in || a[i].out != b[i].out) return 0;
        if (memcmp(a[i].down, b[i].down, (size_t)a[i].rank * a[i].in * sizeof(float)) ||
            memcmp(a[i].up, b[i].up, (size_t)a[i].out * a[i].rank * sizeof(float))) return 0;
    }
    return 1;
}

static int same_file(const EdloraFile *a, const EdloraFile *b) {
    if (a->n_emb != b->n_emb) return 0;
    for (int i = 0; i < a->n_emb; i++)
        if (strcmp(a->emb[i].word, b->emb[i].word) || a->emb[i].T != b->emb[i].T || a->emb[i].D != b->emb[i].D ||
            memcmp(a->emb[i].emb, b->emb[i].emb, (size_t)a->emb[i].T * a->emb[i].D * sizeof(float))) return 0;
    return same_modules(a->te, a->n_te, b->te, b->n_te) && same_modules(a->unet, a->n_unet, b->unet, b->n_unet);
}

/* The official file, its order, and both round trips. */
static void test_files(const MsModel *m) {
    EdloraFile f, g, h;
    if (!check(edlora_read(DIR "edlora_tiny.pth", &f) == MS_OK, "read edlora_tiny.pth (torch.save, requires_grad): %s",
               ms_last_error())) return;
    check(f.n_emb == 2 && edlora_tokens_per_word(&f) == 16 && f.emb[0].D == 32 && !strcmp(f.emb[0].word, "<cat1>") &&
          !strcmp(f.emb[1].word, "<cat2>"), "2 words x 16 tokens x 32 in file order (%d words, T %d)", f.n_emb,
          edlora_tokens_per_word(&f));
    check(f.n_te == 8 && f.n_unet == 128 && f.te[0].rank == 4, "8 text encoder + 128 UNet modules, rank 4 (%d + %d)",
          f.n_te, f.n_unet);
    /* runtime types and back: the writer's order is the official dict order */
    UNetParams up;
    Arena train = { 0 };
    ClipLora cl;
    UNetLora ul;
    float *cmem = NULL;
    if (check(unet_params_init(&up, &m->unet_config, &m->unet) == MS_OK, "unet params: %s", ms_last_error())) {
        arena_init(&train, unet_lora_floats(&m->unet_config, 4) * sizeof(float) + 65536);
        MsStatus s1 = edlora_to_clip_lora(&f, &m->text_config, 1.0f, &cl, &cmem);
        MsStatus s2 = s1 ? s1 : edlora_to_unet_lora(&f, &up, 1.0f, &train, &ul);
        check(s1 == MS_OK && s2 == MS_OK, "file -> ClipLora + UNetLora: %s", ms_last_error());
        if (!s1 && !s2) {
            char words[2][MS_WORD_MAX] = { "<cat1>", "<cat2>" };
            float *emb = test_zeros((size_t)2 * 16 * 32);
            memcpy(emb, f.emb[0].emb, 16 * 32 * sizeof(float));
            memcpy(emb + 16 * 32, f.emb[1].emb, 16 * 32 * sizeof(float));
            check(edlora_from_lora(&g, 2, (const char (*)[MS_WORD_MAX])words, 16, 32, emb, &cl, &up, &ul) == MS_OK,
                  "ClipLora + UNetLora -> file: %s", ms_last_error());
            check(same_file(&f, &g), "rebuilt file == official file, same order (k,v,q,out; down, up, mid blocks)");
            edlora_free(&g);
            ms_free_aligned(emb);
        }
        ms_free_aligned(cmem);
        arena_free(&train);
        unet_params_free(&up);
    }
    /* round trips */
    const char *ext[2] = { ".pth", ".safetensors" };
    for (int k = 0; k < 2; k++) {
        const char *p = tmp_path(ext[k]);
        MsStatus s = edlora_write(p, &f);
        check(s == MS_OK, "write %s: %s", ext[k], ms_last_error());
        if (!s && check(edlora_read(p, &h) == MS_OK, "read back %s: %s", ext[k], ms_last_error())) {
            check(same_file(&f, &h), "%s round trip: same words, modules, order and values", ext[k]);
            edlora_free(&h);
        }
        const char *keep = getenv("MS_EDLORA_KEEP");     /* for tools/ref/gen_edlora_golden.py --check */
        if (keep && *keep && k == 0 && !s) {
            check(edlora_write(keep, &f) == MS_OK, "write %s", keep);
        }
        remove(p);
    }
    edlora_free(&f);
    /* plain LoRA file */
    if (check(edlora_read(DIR "lora_tiny.pth", &f) == MS_OK, "read lora_tiny.pth: %s", ms_last_error())) {
        check(f.n_emb == 2 && edlora_tokens_per_word(&f) == 1, "plain LoRA: 1 token per word (%d)", edlora_tokens_per_word(&f));
        edlora_free(&f);
    }
}

typedef struct { float *traj; size_t n; int steps; } Rec;
static void record(void *ctx, int step, int n_steps, const float *latents, size_t n) {
    Rec *r = (Rec *)ctx;
    if (step < r->steps && n == r->n && n_steps == r->steps) memcpy(r->traj + (size_t)step * n, latents, n * sizeof(float));
}

static float *load(const char *key, size_t n) {
    float *x = NULL;
    size_t got = 0;
    if (st_load_f32(&G, key, &x, &got) || got != n) {
        check(0, "golden %s (%zu values, got %zu): %s", key, n, got, ms_last_error());
        if (x) ms_free_aligned(x);
        return NULL;
    }
    return x;
}

static void check_u8(const char *what, const uint8_t *got, const StTensor *want, size_t n) {
    if (!want || want->numel != n || want->dtype != ST_U8) { check(0, "%s: golden pixels missing", what); return; }
    int maxd = 0;
    size_t ndiff = 0;
    for (size_t i = 0; i < n; i++) {
        int d = abs((int)got[i] - (int)want->data[i]);
        if (d > maxd) maxd = d;
        ndiff += d != 0;
    }
    check(maxd <= 1, "%-40s uint8 max diff %d (tol 1), %zu of %zu values differ", what, maxd, ndiff, n);
}

static void test_run(const JsonValue *j) {
    const char *name = json_get_string(j, "name", "?"), *file = json_get_string(j, "file", "");
    const JsonValue *neg = json_get(j, "negative");
    char path[256], key[96], what[128];
    snprintf(path, sizeof path, DIR "%s", file);
    MsModel m;
    ClipTokenizer tok;
    EdloraFile f;
    EdloraPrompt ep;
    MsTxt2ImgOptions o;
    memset(&o, 0, sizeof o);
    if (!check(ms_model_load(MODEL, NULL, &m) == MS_OK, "load model: %s", ms_last_error())) return;
    if (!check(ms_clip_tokenizer_load(MODEL, &tok) == MS_OK, "load tokenizer: %s", ms_last_error())) { ms_model_free(&m); return; }
    const float alpha = (float)json_get_number(j, "alpha", 0.7);
    MsStatus s = edlora_read(path, &f);
    if (!s) s = edlora_merge(&m, &f, alpha);
    if (!s) s = edlora_prepare(&f, &tok, &m, &ep, &o);
    if (check(s == MS_OK, "%s: read, merge at %.2f, add tokens: %s", name, (double)alpha, ms_last_error())) {
        check(json_get_bool(j, "enable_edlora", 0) ? o.n_layer_ctx == 16 && o.n_bind == 2 : o.n_layer_ctx == 0 && o.n_bind == 0,
              "%s: %d layer-wise contexts, %d words bound", name, o.n_layer_ctx, o.n_bind);
        o.prompt = json_get_string(j, "prompt", "");
        o.negative = neg && neg->type == JSON_STRING ? neg->str : NULL;
        o.width = (int)json_get_int(j, "width", 0);
        o.height = (int)json_get_int(j, "height", 0);
        o.steps = (int)json_get_int(j, "steps", 0);
        o.batch = 1;
        o.guidance_scale = (float)json_get_number(j, "cfg", 1.0);
        o.seed = (uint64_t)json_get_int(j, "seed", 0);
        o.sampler = MS_SCHED_DPMSOLVER;
        o.torch_cpu = MS_TORCH_CPU_AVX2;
        const size_t nl = (size_t)4 * (o.height / 8) * (o.width / 8), ni = (size_t)3 * o.height * o.width;
        Rec rec = { test_zeros(nl * o.steps), nl, o.steps };
        o.progress = record;
        o.progress_ctx = &rec;
        float *img = test_zeros(ni);
        uint8_t *px = (uint8_t *)malloc(ni);
        s = ms_txt2img(&m, &tok, &o, img);
        check(s == MS_OK, "%s: ms_txt2img %dx%d, %d steps: %s", name, o.width, o.height, o.steps, ms_last_error());
        snprintf(key, sizeof key, "%s/latents", name);
        float *want = load(key, nl * o.steps);
        if (want && !s) {
            double worst = 0.0;
            int wi = 0;
            for (int i = 0; i < o.steps; i++) {
                TestErr e = test_err_f(rec.traj + (size_t)i * nl, want + (size_t)i * nl, nl);
                if (!(e.rel_l2 <= worst)) { worst = e.rel_l2; wi = i; }
            }
            snprintf(what, sizeof what, "%s latents, every step", name);
            check(worst <= 1e-4, "%-40s worst rel_l2 %.3e at step %d (tol 1e-4)", what, worst, wi);
            if (!(worst <= 1e-4)) check_close(what, rec.traj + (size_t)wi * nl, want + (size_t)wi * nl, nl, 1e-4, 0);
        }
        snprintf(key, sizeof key, "%s/image", name);
        float *wimg = load(key, ni);
        snprintf(what, sizeof what, "%s decoded image", name);
        if (wimg && !s) check_close(what, img, wimg, ni, 1e-4, 0);
        snprintf(key, sizeof key, "%s/u8", name);
        snprintf(what, sizeof what, "%s image uint8", name);
        if (!s) { ms_image_to_u8(px, img, 3, o.height, o.width); check_u8(what, px, st_find(&G, key), ni); }
        ms_free_aligned(want); ms_free_aligned(wimg); ms_free_aligned(rec.traj); ms_free_aligned(img); free(px);
        /* the same file again on the same tokenizer: the tokens exist already */
        EdloraPrompt ep2;
        MsTxt2ImgOptions o2;
        memset(&o2, 0, sizeof o2);
        s = edlora_prepare(&f, &tok, &m, &ep2, &o2);
        check(s == MS_ERR_ARG && strstr(ms_last_error(), "already in the tokenizer") != NULL,
              "%s: tokens added twice fail: %s", name, ms_last_error());
        edlora_prompt_free(&ep);
    }
    edlora_free(&f);
    clip_tokenizer_free(&tok);
    ms_model_free(&m);
}

/* `mixshow sample --edlora FILE:ALPHA` end to end. */
static void test_cmd(const JsonValue *j) {
    char steps[16], seed[32], cfg[32], W[16], H[16], ed[300];
    snprintf(steps, sizeof steps, "%d", (int)json_get_int(j, "steps", 0));
    snprintf(seed, sizeof seed, "%lld", (long long)json_get_int(j, "seed", 0));
    snprintf(cfg, sizeof cfg, "%.17g", json_get_number(j, "cfg", 0));
    snprintf(W, sizeof W, "%d", (int)json_get_int(j, "width", 0));
    snprintf(H, sizeof H, "%d", (int)json_get_int(j, "height", 0));
    snprintf(ed, sizeof ed, DIR "%s:%.17g", json_get_string(j, "file", ""), json_get_number(j, "alpha", 0.7));
    const char *out = tmp_path(".png");
    char *argv[] = { "sample", "--model", MODEL, "-p", (char *)json_get_string(j, "prompt", ""),
                     "-n", (char *)json_get_string(j, "negative", ""), "--steps", steps, "--seed", seed,
                     "--cfg", cfg, "-W", W, "-H", H, "--edlora", ed, "-o", (char *)out };
    int rc = cmd_sample((int)(sizeof argv / sizeof argv[0]), argv);
    check(rc == 0, "mixshow sample --edlora %s: exit status %d", ed, rc);
    MsImage img;
    if (rc == 0 && check(ms_image_read(out, 3, &img) == MS_OK, "read %s: %s", out, ms_last_error())) {
        check_u8("mixshow sample --edlora PNG vs official", (const uint8_t *)img.data, st_find(&G, "edlora/u8"),
                 (size_t)img.w * img.h * 3);
        ms_image_free(&img);
    }
    remove(out);
}

/* A .pth with the given (name, shape) tensors, values 0.01 * index. */
static MsStatus write_pth(const char *path, int n, const char *const *names, const int64_t (*shapes)[2]) {
    PthSaveTensor t[8];
    static float data[4096];
    for (int i = 0; i < 4096; i++) data[i] = 0.01f * (float)(i % 97);
    memset(t, 0, sizeof t);
    for (int i = 0; i < n; i++) {
        t[i].name = names[i]; t[i].nest = 2; t[i].dtype = PTH_F32; t[i].ndim = 2;
        t[i].shape[0] = shapes[i][0]; t[i].shape[1] = shapes[i][1]; t[i].data = data; t[i].requires_grad = 1;
    }
    return pth_save(path, t, (size_t)n);
}

static void expect_read_error(const char *what, int n, const char *const *names, const int64_t (*shapes)[2],
                              const char *needle) {
    const char *p = tmp_path(".pth");
    EdloraFile f;
    if (!check(write_pth(p, n, names, shapes) == MS_OK, "%s: write test file: %s", what, ms_last_error())) return;
    MsStatus s = edlora_read(p, &f);
    check(s != MS_OK && strstr(ms_last_error(), needle) != NULL, "%s fails naming '%s': %s", what, needle, ms_last_error());
    if (!s) edlora_free(&f);
    remove(p);
}

static void test_bad(const MsModel *m0) {
    static const int64_t sh_ok[2][2] = { { 4, 32 }, { 32, 4 } }, sh_rank[2][2] = { { 4, 32 }, { 32, 3 } };
    const char *te_q[2] = { "params.text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight",
                            "params.text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight" };
    expect_read_error("lora_down without lora_up", 1, te_q, sh_ok, "q_proj.lora_up.weight");
    expect_read_error("rank 4 down, rank 3 up", 2, te_q, sh_rank, "rank 3");
    const char *sec[1] = { "params.vae.x.lora_down.weight" };
    expect_read_error("unknown section", 1, sec, sh_ok, "section 'vae'");
    const char *suf[1] = { "params.unet.down_blocks.0.attentions.0.proj_in.weight" };
    expect_read_error("key without lora_down/lora_up", 1, suf, sh_ok, "proj_in.weight");
    const char *emb[1] = { "params.new_concept_embedding.<a>" };
    static const int64_t sh_emb[1][2] = { { 3, 32 } };
    EdloraFile f;
    const char *p = tmp_path(".pth");
    if (write_pth(p, 1, emb, sh_emb) == MS_OK && edlora_read(p, &f) == MS_OK) {
        MsModel m;
        ClipTokenizer tok;
        EdloraPrompt ep;
        MsTxt2ImgOptions o;
        memset(&o, 0, sizeof o);
        if (ms_model_load(MODEL, NULL, &m) == MS_OK && ms_clip_tokenizer_load(MODEL, &tok) == MS_OK) {
            MsStatus s = edlora_prepare(&f, &tok, &m, &ep, &o);
            check(s != MS_OK && strstr(ms_last_error(), "3 tokens per concept word"), "3 tokens per word refused: %s",
                  ms_last_error());
            clip_tokenizer_free(&tok);
            ms_model_free(&m);
        }
        edlora_free(&f);
    } else check(0, "write/read a 3-token embedding: %s", ms_last_error());
    remove(p);
    /* modules the model does not have, shapes that do not fit */
    MsModel m;
    if (!check(ms_model_load(MODEL, NULL, &m) == MS_OK, "load model: %s", ms_last_error())) return;
    float down[4 * 64], up[64 * 4];
    memset(down, 0, sizeof down); memset(up, 0, sizeof up);
    memset(&f, 0, sizeof f);
    edlora_add_module(&f, 0, "text_model.encoder.layers.7.self_attn.q_proj", 4, 32, 32, down, up);
    check(edlora_merge(&m, &f, 0.7f) != MS_OK && strstr(ms_last_error(), "layers.7.self_attn.q_proj"),
          "merge: module the model lacks: %s", ms_last_error());
    float *mem = NULL;
    ClipLora cl;
    check(edlora_to_clip_lora(&f, &m.text_config, 1.0f, &cl, &mem) != MS_OK && strstr(ms_last_error(), "layers.7"),
          "ClipLora: module the model lacks: %s", ms_last_error());
    ms_free_aligned(mem);
    edlora_free(&f);
    edlora_add_module(&f, 1, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4, 64, 32, down, up);
    check(edlora_merge(&m, &f, 0.7f) != MS_OK && strstr(ms_last_error(), "attn2.to_k"), "merge: shape mismatch: %s",
          ms_last_error());
    edlora_free(&f);
    (void)m0;
    ms_model_free(&m);
}

/* edlora_fit_layers: 16 token variants per word on a UNet of 7 cross-attention layers keep the
 * first 7 rows of every word (same data, T = 7); T <= layers and plain LoRA (T = 1) unchanged */
static void test_fit_layers(void) {
    float a[16 * 3], b[16 * 3];
    EdloraEmbedding e[2];
    EdloraFile f;
    memset(&f, 0, sizeof f); memset(e, 0, sizeof e);
    for (int i = 0; i < 48; i++) { a[i] = (float)i; b[i] = (float)(100 + i); }
    snprintf(e[0].word, sizeof e[0].word, "<x1>"); snprintf(e[1].word, sizeof e[1].word, "<x2>");
    e[0].T = e[1].T = 16; e[0].D = e[1].D = 3; e[0].emb = a; e[1].emb = b;
    f.emb = e; f.n_emb = 2;
    check(edlora_fit_layers(&f, 16) == 16 && e[0].T == 16, "16 variants, 16 layers: unchanged");
    check(edlora_fit_layers(&f, 7) == 7 && e[0].T == 7 && e[1].T == 7 && e[0].emb == a && e[1].emb == b &&
          e[1].emb[7 * 3 - 1] == 120.0f, "16 variants, 7 layers: T 7, the first 7 rows of each word");
    e[0].T = e[1].T = 1;
    check(edlora_fit_layers(&f, 7) == 1 && e[0].T == 1, "plain LoRA (1 per word): unchanged");
}

int main(void) {
    MsModel m;
    test_fit_layers();
    double t0 = ms_time();
    ms_set_threads(1);
    if (!check(ms_model_load(MODEL, NULL, &m) == MS_OK, "load %s: %s", MODEL, ms_last_error())) return test_summary("test_edlora");
    test_files(&m);
    JsonValue *runs = NULL;
    if (check(st_open(&G, DIR "golden.safetensors") == MS_OK, "open golden: %s", ms_last_error())) {
        const char *rj = st_meta(&G, "runs");
        if (check(rj && json_parse(rj, strlen(rj), "golden runs", &runs) == MS_OK && runs->type == JSON_ARRAY,
                  "golden metadata 'runs'")) {
            for (size_t r = 0; r < json_len(runs); r++) test_run(json_at(runs, r));
            test_cmd(json_at(runs, 0));
        }
        json_free(runs);
        st_close(&G);
    }
    test_bad(&m);
    ms_model_free(&m);
    ms_gemm_scratch_free();
    ops_scratch_free();
    printf("  time %.2f s\n", ms_time() - t0);
    return test_summary("test_edlora");
}
