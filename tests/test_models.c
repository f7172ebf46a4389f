/* tests/test_models.c — models as users have them (issue 13): single files with no config and
 * no tokenizer folder, configs read off the tensor shapes, the shipped CLIP BPE files, and an
 * installed copy (make install into a temporary prefix).
 *
 *   - the shared tiny LDM file (../shared/models/tiny-sd/tiny_ldm.safetensors) through
 *     ms_open_model: same configs, same parameters and the same sampled image (bitwise) as its
 *     diffusers folder;
 *   - a single file of another topology (model_b's UNet: widths 24/48/48/48, 1 layer per block,
 *     heads 3/2/4/3, written by `mixshow convert`): with mixshow's config metadata it matches the
 *     folder bitwise; without, the shape-determined fields match the folder and the rest is
 *     reported as assumed, and --config restores the folder's outputs;
 *   - bad files: a width that fits no topology, a missing tensor, each named in the error;
 *   - an installed copy (make install, staged with DESTDIR) samples, tokenizes and dumps from
 *     another working directory; make uninstall removes it. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdtemp, mkdir */
#endif
#include "tests/test.h"
#include "tools/tools.h"

#if !defined(_WIN32)
#include <sys/stat.h>
#include <unistd.h>
#endif

static char g_tmp[512];
static const char *MODEL_B = "tests/data/train_golden/model_b";

static const char *shared(const char *rel) {
    static char buf[2][2048];
    static int k;
    k ^= 1;
    snprintf(buf[k], sizeof buf[k], "%s/models/%s", test_shared_dir(), rel);
    return buf[k];
}

static int file_exists(const char *p) {
    FILE *f = fopen(p, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static int tables_equal(const MsModel *a, const MsModel *b) {
    const MsParamTable *ta[3] = { &a->unet, &a->vae, &a->text }, *tb[3] = { &b->unet, &b->vae, &b->text };
    for (int m = 0; m < 3; m++) {
        if (ta[m]->n != tb[m]->n) return 0;
        for (int i = 0; i < ta[m]->n; i++) {
            const MsParam *p = &ta[m]->p[i], *q = &tb[m]->p[i];
            if (strcmp(p->name, q->name) || p->numel != q->numel || !p->f32 != !q->f32) return 0;
            if (p->f32 && memcmp(p->f32, q->f32, p->numel * sizeof(float))) return 0;
        }
    }
    return 1;
}

static int configs_equal(const MsModel *a, const MsModel *b) {
    return !memcmp(&a->unet_config, &b->unet_config, sizeof a->unet_config) &&
           !memcmp(&a->vae_config, &b->vae_config, sizeof a->vae_config) &&
           !memcmp(&a->text_config, &b->text_config, sizeof a->text_config) &&
           !memcmp(&a->scheduler_config, &b->scheduler_config, sizeof a->scheduler_config);
}

/* A 64 x 64 image, 3 DPM-Solver++ steps with CFG: (3, 64, 64) floats, malloc'ed; NULL on error. */
static float *sample_image_release(const MsModel *m, const ClipTokenizer *tok, MsModel *release) {
    MsTxt2ImgOptions o;
    memset(&o, 0, sizeof o);
    o.release = release;
    o.prompt = "a photo of a cat"; o.width = o.height = 64; o.steps = 3; o.guidance_scale = 7.5f; o.seed = 7;
    o.sampler = MS_SCHED_DPMSOLVER; o.torch_cpu = MS_TORCH_CPU_AVX2; o.batch = 1;
    float *img = (float *)ms_alloc_aligned((size_t)3 * 64 * 64, sizeof(float));
    if (img && ms_txt2img(m, tok, &o, img)) { printf("      txt2img: %s\n", ms_last_error()); ms_free_aligned(img); img = NULL; }
    return img;
}
static float *sample_image(const MsModel *m, const ClipTokenizer *tok) { return sample_image_release(m, tok, NULL); }

static const MsOpenOptions QUIET = { NULL, NULL, 0, 1 };

/* path (single file) against the folder: configs, tables, image. */
static void compare_with_folder(const char *label, const char *path, const MsOpenOptions *o, const char *folder) {
    MsModel a, b;
    ClipTokenizer ta, tb;
    char notes[4096];
    MsStatus s = ms_open_model(folder, &QUIET, &a, &ta, NULL, 0);
    if (!check(s == MS_OK, "%s: folder %s opens (%s)", label, folder, s ? ms_last_error() : "ok")) return;
    s = ms_open_model(path, o, &b, &tb, notes, sizeof notes);
    if (check(s == MS_OK, "%s: %s opens with no config and no tokenizer folder (%s)", label, path,
              s ? ms_last_error() : "ok")) {
        if (test_is_verbose()) printf("%s", notes);
        check(configs_equal(&a, &b), "%s: configs == the folder's", label);
        check(tables_equal(&a, &b), "%s: every parameter == the folder's (bitwise)", label);
        check(strstr(notes, "shipped with mixshow") != NULL, "%s: notes say the shipped tokenizer is used", label);
        float *x = sample_image(&a, &ta), *y = x ? sample_image(&b, &tb) : NULL;
        if (check(x && y, "%s: both sample", label)) check_bitwise(label, y, x, (size_t)3 * 64 * 64);
        ms_free_aligned(x); ms_free_aligned(y);
        ms_model_free(&b);
        clip_tokenizer_free(&tb);
    }
    ms_model_free(&a);
    clip_tokenizer_free(&ta);
}

/* MsTxt2ImgOptions.release (`mixshow sample`): the same image, the text encoder and UNet weights
 * freed on the way (the VAE's kept), and a model other than the one sampled is refused. */
static void test_release(void) {
    MsModel a, b;
    ClipTokenizer ta, tb;
    if (!check(ms_open_model(test_tiny_dir(), &QUIET, &a, &ta, NULL, 0) == MS_OK, "release: tiny model opens")) return;
    if (!check(ms_open_model(test_tiny_dir(), &QUIET, &b, &tb, NULL, 0) == MS_OK, "release: tiny model opens")) {
        ms_model_free(&a); clip_tokenizer_free(&ta); return;
    }
    float *x = sample_image(&a, &ta), *y = NULL;
    check(x && !sample_image_release(&a, &ta, &b), "release: another model than the one sampled is refused");
    check(x && a.text.mem && a.unet.mem && a.vae.mem, "release: without it the model is kept");
    y = x ? sample_image_release(&a, &ta, &a) : NULL;
    if (check(x && y, "release: samples")) check_bitwise("release: image == without release", y, x, (size_t)3 * 64 * 64);
    check(!a.text.mem && !a.unet.mem && a.vae.mem && a.text.n && !a.unet.p[0].f32 && !a.unet.p[0].half,
          "release: text encoder and UNet data freed (names kept), VAE kept");
    ms_free_aligned(x); ms_free_aligned(y);
    ms_model_free(&a); ms_model_free(&b);
    clip_tokenizer_free(&ta); clip_tokenizer_free(&tb);
}

static void test_tokenizer(void) {
    char dir[4200];
    int shipped = 0;
    MsStatus s = ms_find_tokenizer("tests/data", NULL, dir, sizeof dir, &shipped);
    check(s == MS_OK && shipped, "a folder without tokenizer/: the shipped CLIP BPE files (%s)", s ? ms_last_error() : dir);
    ClipTokenizer t;
    int32_t ids[77];
    static const int32_t want[7] = { 49406, 320, 1125, 539, 320, 2368, 49407 };
    if (!s && !ms_clip_tokenizer_load(dir, &t)) {
        s = clip_tokenize(&t, "a photo of a cat", 16, ids, 77);
        check(!s && !memcmp(ids, want, sizeof want) && ids[76] == 49407, "shipped tokenizer: 'a photo of a cat' -> "
              "49406 320 1125 539 320 2368 49407 ...");
        clip_tokenizer_free(&t);
    }
    s = ms_find_tokenizer(NULL, "tests/no-such-dir", dir, sizeof dir, &shipped);
    check(s != MS_OK && strstr(ms_last_error(), "no-such-dir"), "--tokenizer DIR without vocab.json -> %s",
          ms_last_error());
    s = ms_find_tokenizer("models/tiny-sd", NULL, dir, sizeof dir, &shipped);
    check(s == MS_OK && !shipped && strstr(dir, "models/tiny-sd/tokenizer"), "a folder's own tokenizer/ wins");
    /* no model: the default (models/world when it is shipped, else models/tiny-sd), whichever it is
     * here; the order itself is checked by test_default_model on data roots made for it */
    MsModel m, d;
    char def[4200], notes[4096];
    const char *name = ms_default_model(def, sizeof def);
    s = ms_open_model(NULL, &QUIET, &m, NULL, notes, sizeof notes);
    if (check(name && s == MS_OK && strstr(notes, def) && strstr(notes, "no --model"), "no model: the default %s (%s)",
              name ? name : "(none)", name ? def : "")) {
        if (check(ms_open_model(def, &QUIET, &d, NULL, NULL, 0) == MS_OK, "%s opens", def)) {
            check(configs_equal(&m, &d) && tables_equal(&m, &d), "no model == --model %s", def);
            ms_model_free(&d);
        }
        ms_model_free(&m);
    }
    char tiny[4200];
    check(ms_find_tiny_model(tiny, sizeof tiny) && strstr(tiny, "models/tiny-sd"), "ms_find_tiny_model: %s", tiny);
}

/* Writes a copy of src (every tensor as f32 / raw) with tensor `name` replaced by the given shape
 * (zeros) or left out (ndim < 0). */
static MsStatus rewrite(const char *src, const char *dst, const char *name, int ndim, const int64_t *shape) {
    StFile f;
    MsStatus s = st_open(&f, src);
    if (s) return s;
    if (!st_find(&f, name)) { st_close(&f); return ms_errorf(MS_ERR_ARG, "%s: no tensor '%s' to change", src, name); }
    StEntry *e = (StEntry *)calloc(f.count, sizeof *e);
    float **buf = (float **)calloc(f.count, sizeof *buf);
    size_t n = 0;
    for (size_t i = 0; i < f.count && !s; i++) {
        const StTensor *t = &f.tensors[i];
        int hit = !strcmp(t->name, name);
        if (hit && ndim < 0) continue;
        StEntry *x = &e[n++];
        x->name = t->name; x->dtype = t->dtype; x->ndim = hit ? ndim : t->ndim;
        size_t numel = 1;
        for (int d = 0; d < x->ndim; d++) { x->shape[d] = hit ? shape[d] : t->shape[d]; numel *= (size_t)x->shape[d]; }
        if (t->dtype == ST_F32) {
            buf[i] = (float *)calloc(numel ? numel : 1, sizeof(float));
            if (!hit) s = st_to_f32(&f, t, buf[i], numel);
            x->f32 = buf[i];
        } else {
            x->raw = t->data;          /* I64 position ids: little-endian host in these tests */
        }
    }
    if (!s) s = st_write(dst, e, n, NULL, 0);
    for (size_t i = 0; i < f.count; i++) free(buf[i]);
    free(buf); free(e);
    st_close(&f);
    return s;
}

static void test_bad_files(const char *bare) {
    char p[700];
    MsModel m;
    snprintf(p, sizeof p, "%s/bad.safetensors", g_tmp);
    static const struct { const char *name; int ndim; int64_t shape[4]; const char *why; } cases[] = {
        { "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", 4, { 24, 25, 3, 3 }, "a resnet reading 25 of 24 channels" },
        { "model.diffusion_model.input_blocks.0.0.weight", 3, { 24, 4, 3 }, "a 3-D conv_in" },
        { "model.diffusion_model.out.2.weight", 4, { 4, 24, 3, 2 }, "a 3x2 conv_out kernel" },
        { "model.diffusion_model.input_blocks.1.1.proj_in.weight", 4, { 24, 23, 1, 1 }, "proj_in 24x23 (fits no config)" },
        { "first_stage_model.encoder.conv_in.weight", -1, { 0 }, "an LDM file without the VAE's conv_in" },
        { "model.diffusion_model.middle_block.1.norm.bias", -1, { 0 }, "an LDM file without a mid-block norm bias" },
        { "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight", -1, { 0 }, "an LDM file without a CLIP fc2" },
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        MsStatus s = rewrite(bare, p, cases[k].name, cases[k].ndim, cases[k].shape);
        if (!check(s == MS_OK, "write a file with %s (%s)", cases[k].why, s ? ms_last_error() : "ok")) continue;
        s = ms_open_model(p, &QUIET, &m, NULL, NULL, 0);
        check(s != MS_OK && strstr(ms_last_error(), cases[k].name) != NULL, "%s -> refused, naming the tensor: %s",
              cases[k].why, s ? ms_last_error() : "(loaded)");
        ms_model_free(&m);
    }
    remove(p);
}

static void test_model_b(void) {
    char full[600], bare[600];
    snprintf(full, sizeof full, "%s/model_b.safetensors", g_tmp);
    snprintf(bare, sizeof bare, "%s/model_b_bare.safetensors", g_tmp);
    char *av1[] = { "convert", (char *)MODEL_B, full, NULL };
    char *av2[] = { "convert", (char *)MODEL_B, bare, "--no-config-metadata", NULL };
    if (!check(cmd_convert(3, av1) == 0 && cmd_convert(4, av2) == 0, "convert model_b -> LDM single files (with and "
               "without config metadata)"))
        return;
    compare_with_folder("model_b LDM file, mixshow metadata", full, &QUIET, MODEL_B);

    /* no metadata: widths, layers, depths from the shapes; heads and groups assumed */
    MsModel a, b;
    char notes[4096];
    MsStatus s = ms_open_model(MODEL_B, &QUIET, &a, NULL, NULL, 0);
    if (!check(s == MS_OK, "model_b folder loads")) return;
    s = ms_open_model(bare, &QUIET, &b, NULL, notes, sizeof notes);
    if (check(s == MS_OK, "model_b LDM file without metadata: configs inferred (%s)", s ? ms_last_error() : "ok")) {
        if (test_is_verbose()) printf("%s", notes);
        const UNetConfig *x = &a.unet_config, *y = &b.unet_config;
        int same = x->n_blocks == y->n_blocks && x->layers_per_block == y->layers_per_block &&
                   x->cross_attention_dim == y->cross_attention_dim && x->in_channels == y->in_channels &&
                   x->out_channels == y->out_channels && x->use_linear_projection == y->use_linear_projection &&
                   x->time_embedding_dim == y->time_embedding_dim && x->conv_in_kernel == y->conv_in_kernel;
        for (int i = 0; i < x->n_blocks; i++)
            same &= x->block_out_channels[i] == y->block_out_channels[i] && x->down_block_types[i] == y->down_block_types[i] &&
                    x->up_block_types[i] == y->up_block_types[i] &&
                    x->transformer_layers_per_block[i] == y->transformer_layers_per_block[i];
        check(same, "inferred UNet: widths %d,%d,%d,%d, %d layer(s) per block, cross-attention %d, block types, depths "
              "== the folder's", y->block_out_channels[0], y->block_out_channels[1], y->block_out_channels[2],
              y->block_out_channels[3], y->layers_per_block, y->cross_attention_dim);
        check(!memcmp(&a.text_config, &b.text_config, sizeof a.text_config) || (a.text_config.hidden_size == b.text_config.hidden_size &&
              a.text_config.num_hidden_layers == b.text_config.num_hidden_layers && a.text_config.vocab_size == b.text_config.vocab_size &&
              a.text_config.intermediate_size == b.text_config.intermediate_size),
              "inferred text encoder: width %d, %d layers, MLP %d, vocabulary %d", b.text_config.hidden_size,
              b.text_config.num_hidden_layers, b.text_config.intermediate_size, b.text_config.vocab_size);
        int vsame = a.vae_config.n_blocks == b.vae_config.n_blocks && a.vae_config.layers_per_block == b.vae_config.layers_per_block &&
                    a.vae_config.latent_channels == b.vae_config.latent_channels;
        for (int i = 0; i < a.vae_config.n_blocks; i++) vsame &= a.vae_config.block_out_channels[i] == b.vae_config.block_out_channels[i];
        check(vsame, "inferred VAE: widths, layers, latent channels == the folder's");
        check(y->attention_head_dim[0] == 8 && y->norm_num_groups == 24 && strstr(notes, "assumed") &&
              strstr(notes, "8 attention heads") && strstr(notes, "reduced"),
              "heads and GroupNorm are assumed and said so: 8 heads, GroupNorm 32 reduced to 24 (folder: heads 3/2/4/3, 8)");
        check(tables_equal(&a, &b), "parameters == the folder's (bitwise)");
        ms_model_free(&b);
    }
    ms_model_free(&a);
    MsOpenOptions o = QUIET;
    o.config_dir = MODEL_B;
    compare_with_folder("model_b LDM file, --config model_b", bare, &o, MODEL_B);
    test_bad_files(bare);
    remove(full);
    remove(bare);
}

/* A TencentARC-layout adapter file (written from the tiny sketch adapter's folder under its
 * original key names): widths and blocks from its shapes, not SD 1.5's 320..1280. */
static void test_adapter_file(void) {
    AdapterConfig a, b;
    MsParamTable ta, tb;
    char p[700];
    snprintf(p, sizeof p, "%s/sketch_tencentarc.safetensors", g_tmp);
    if (!check(ms_adapter_load("models/tiny-sd/t2iadapter_sketch", NULL, &a, &ta) == MS_OK, "tiny sketch adapter folder loads"))
        return;
    StEntry *e = (StEntry *)calloc((size_t)ta.n, sizeof *e);
    for (int i = 0; e && i < ta.n; i++) {
        e[i].name = ta.p[i].ldm; e[i].dtype = ST_F32; e[i].ndim = ta.p[i].ndim; e[i].f32 = ta.p[i].f32;
        for (int d = 0; d < ta.p[i].ndim; d++) e[i].shape[d] = ta.p[i].shape[d];
    }
    MsStatus s = e ? st_write(p, e, (size_t)ta.n, NULL, 0) : MS_ERR_NOMEM;
    if (!s) s = ms_adapter_load(p, NULL, &b, &tb);
    if (check(s == MS_OK, "TencentARC-layout file of the tiny adapter loads (%s)", s ? ms_last_error() : "ok")) {
        int same = !memcmp(&a, &b, sizeof a) && ta.n == tb.n;
        for (int i = 0; same && i < ta.n; i++) same = !memcmp(ta.p[i].f32, tb.p[i].f32, ta.p[i].numel * sizeof(float));
        check(same, "its config (widths %d,%d,%d,%d, %d resnets per block, in_channels %d) and weights == the folder's",
              b.channels[0], b.channels[1], b.channels[2], b.channels[3], b.num_res_blocks, b.in_channels);
        ms_param_table_free(&tb);
    }
    free(e);
    ms_param_table_free(&ta);
    remove(p);
}

/* `make install` staged into a temporary folder (DESTDIR; PREFIX left at its default, so that
 * nothing is recompiled: this test may run in an asan/ubsan build folder whose flags it does not
 * know), then the installed binary from another directory: it finds its data relative to itself
 * (PREFIX/bin/../share/mixshow), since MS_DATADIR (the default PREFIX) does not hold it. */
static void test_install(const char *argv0) {
#if defined(_WIN32)
    (void)argv0;
    printf("  skip install: not on Windows\n");
#else
    char build[1024], stage[600], prefix[700], cmd[4096], out[800];
    if (system("make --version > /dev/null 2>&1") != 0) { printf("  skip install: no make\n"); return; }
    snprintf(build, sizeof build, "%s", argv0);            /* <BUILD>/tests/test_models */
    char *t = strstr(build, "/tests/test_models");
    if (!t) { printf("  skip install: cannot tell the build folder from %s\n", argv0); return; }
    *t = 0;
    snprintf(stage, sizeof stage, "%s/stage", g_tmp);
    snprintf(prefix, sizeof prefix, "%s/usr/local", stage);
    double t0 = ms_time();
    snprintf(cmd, sizeof cmd, "make -s BUILD='%s' DESTDIR='%s' install > '%s/install.log' 2>&1", build, stage, g_tmp);
    int rc = system(cmd);
    snprintf(out, sizeof out, "%s/bin/mixshow", prefix);
    if (!check(rc == 0 && file_exists(out), "make install DESTDIR=%s -> %s (%.1f s)", stage, out, ms_time() - t0)) {
        snprintf(cmd, sizeof cmd, "cat '%s/install.log'", g_tmp);
        if (system(cmd)) {}
        return;
    }
    snprintf(out, sizeof out, "%s/elsewhere", g_tmp);
    if (mkdir(out, 0777)) { check(0, "mkdir %s", out); return; }
    /* tokenize with the shipped BPE files, from another directory */
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s/bin/mixshow' tokenize 'a photo of a cat' > ids.txt 2> tok.log", out, prefix);
    rc = system(cmd);
    char line[1024] = "", p[1100];
    snprintf(p, sizeof p, "%s/ids.txt", out);
    FILE *f = fopen(p, "r");
    if (f) { if (!fgets(line, sizeof line, f)) line[0] = 0; fclose(f); }
    check(rc == 0 && !strncmp(line, "49406 320 1125 539 320 2368 49407 49407", 39),
          "installed `mixshow tokenize` from another directory: %.40s", line);
    /* sample the installed tiny model, from another directory */
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s/bin/mixshow' sample --model '%s/share/mixshow/models/tiny-sd' -p 'a cat' "
             "--steps 2 -o cat.png > sample.log 2>&1", out, prefix, prefix);
    rc = system(cmd);
    snprintf(p, sizeof p, "%s/cat.png", out);
    check(rc == 0 && file_exists(p), "installed `mixshow sample` (installed tiny model) from another directory");
    /* dump with the embedded model (no --model) */
    snprintf(p, sizeof p, "%s/in.safetensors", out);
    int64_t ids[77];
    for (int i = 0; i < 77; i++) ids[i] = i < 2 ? 49406 + i : 49407;
    StEntry e;
    memset(&e, 0, sizeof e);
    e.name = "in.input_ids"; e.dtype = ST_I64; e.ndim = 2; e.shape[0] = 1; e.shape[1] = 77; e.raw = ids;
    if (!st_write(p, &e, 1, NULL, 0)) {
        snprintf(cmd, sizeof cmd, "cd '%s' && '%s/bin/mixshow' dump --inputs in.safetensors --out out.safetensors > "
                 "dump.log 2>&1", out, prefix);
        rc = system(cmd);
        StFile g;
        snprintf(p, sizeof p, "%s/out.safetensors", out);
        int ok = rc == 0 && !st_open(&g, p);
        /* the installed default: models/world when the tree ships it (make install copies it), else tiny-sd */
        char def[900];
        MsModel dm;
        int width = -1;
        snprintf(def, sizeof def, "%s/share/mixshow/models/world/model_index.json", prefix);
        snprintf(def, sizeof def, "%s/share/mixshow/models/%s", prefix, file_exists(def) ? "world" : "tiny-sd");
        if (!ms_open_model(def, &QUIET, &dm, NULL, NULL, 0)) { width = dm.text_config.hidden_size; ms_model_free(&dm); }
        check(ok && st_find(&g, "text.hidden") && st_find(&g, "text.hidden")->shape[2] == width,
              "installed `mixshow dump` with the default model (%s) from another directory: text.hidden [1,77,%d]", def, width);
        if (ok) st_close(&g);
    }
    snprintf(cmd, sizeof cmd, "make -s BUILD='%s' DESTDIR='%s' uninstall > /dev/null 2>&1", build, stage);
    rc = system(cmd);
    snprintf(p, sizeof p, "%s/bin/mixshow", prefix);
    char q[800];
    snprintf(q, sizeof q, "%s/share/mixshow", prefix);
    check(rc == 0 && !file_exists(p) && !file_exists(q), "make uninstall removes bin/mixshow and share/mixshow");
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", stage, out);
    if (system(cmd)) {}
#endif
}

/* The default model's order on data roots made here: a copy of the binary in ROOT/bin (its data
 * root is ROOT, found next to the executable) with ROOT/models/world and ROOT/models/tiny-sd
 * (symbolic links to the shipped tiny model) picks models/world, for `sample`, `dump` and
 * regional sampling (whose default keypose adapter is then models/world/t2iadapter_openpose: the
 * layout tools/ship_world.sh writes); a root with models/tiny-sd only picks that one. */
static void test_default_model(const char *argv0) {
#if defined(_WIN32)
    (void)argv0;
    printf("  skip default model: not on Windows\n");
#else
    char build[1024], cwd[1024], root[2][600], cmd[6000], p[2048], line[2048];
    snprintf(build, sizeof build, "%s", argv0);            /* <BUILD>/tests/test_models */
    char *t = strstr(build, "/tests/test_models");
    if (!t || !getcwd(cwd, sizeof cwd)) { printf("  skip default model: cannot tell the build folder from %s\n", argv0); return; }
    *t = 0;
    for (int k = 0; k < 2; k++) {
        snprintf(root[k], sizeof root[k], "%s/root%d", g_tmp, k);
        int n = snprintf(cmd, sizeof cmd, "mkdir -p '%s/bin' '%s/models' && cp '%s/mixshow' '%s/bin/mixshow' && "
                         "ln -s '%s/models/tiny-sd' '%s/models/tiny-sd'", root[k], root[k], build, root[k], cwd, root[k]);
        if (!k && n > 0 && (size_t)n < sizeof cmd)
            snprintf(cmd + n, sizeof cmd - (size_t)n, " && ln -s '%s/models/tiny-sd' '%s/models/world'", cwd, root[k]);
        if (!check(system(cmd) == 0, "data root %s (%s)", root[k], k ? "models/tiny-sd" : "models/world + models/tiny-sd"))
            return;
    }
    for (int k = 0; k < 2; k++) {
        const char *want = k ? "/models/tiny-sd: no --model: the embedded random-weight tiny model"
                             : "/models/world: no --model: the shipped world model.";
        snprintf(cmd, sizeof cmd, "cd '%s' && bin/mixshow sample -p 'a red circle above a blue square' --steps 1 -o s.png "
                 "> sample.log 2>&1", root[k]);
        int rc = system(cmd);
        char log[4000] = "";
        snprintf(p, sizeof p, "%s/sample.log", root[k]);
        FILE *f = fopen(p, "r");
        if (f) { size_t n = fread(log, 1, sizeof log - 1, f); log[n] = 0; fclose(f); }
        /* "mixshow: ROOT/bin/../models/world: no --model: ..." (the folder as the data root gives it) */
        const char *w = strstr(log, want), *l0 = w;
        while (l0 && l0 > log && l0[-1] != '\n') l0--;
        snprintf(line, sizeof line, "mixshow: %s/", root[k]);
        check(rc == 0 && w && !strncmp(l0, line, strlen(line)), "sample without --model picks ROOT%s (stderr: %.200s)", want, log);
    }
    /* regional sampling without --pretrained_model, with a keypose condition: the adapter is found
     * at models/world/t2iadapter_openpose; the config text names the model by its short name */
    snprintf(cmd, sizeof cmd, "cd '%s' && bin/mixshow sample '--prompt=a cat' '--prompt_rewrite=[a cat]-*-[]-*-[0, 0, 64, 64]' "
             "'--keypose_condition=%s/tests/data/regional/keypose.png' --steps=1 --seed=1 --save_dir=out > regional.log 2>&1 "
             "&& cat out/seed_1/*.txt > regional.txt", root[0], cwd);
    int rc = system(cmd);
    snprintf(p, sizeof p, "%s/regional.txt", root[0]);
    FILE *f = fopen(p, "r");
    line[0] = 0;
    if (f) { if (!fgets(line, sizeof line, f)) line[0] = 0; fclose(f); }
    check(rc == 0 && !strcmp(line, "pretrained_model: models/world\n"),
          "regional sampling without --pretrained_model: models/world and its t2iadapter_openpose (%s)", line);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", root[0], root[1]);
    if (system(cmd)) {}
#endif
}

int main(int argc, char **argv) {
    (void)argc;
#if !defined(_WIN32)
    snprintf(g_tmp, sizeof g_tmp, "%s", "/tmp/ms_test_models_XXXXXX");
    if (!mkdtemp(g_tmp)) { printf("cannot create a temporary folder\n"); return 1; }
#else
    snprintf(g_tmp, sizeof g_tmp, "%s", ".");
#endif
    ms_set_threads(1);          /* tiny networks: OpenMP barriers would cost more than the work */
    test_tokenizer();
    test_release();
    if (file_exists(shared("tiny-sd/tiny_ldm.safetensors")))
        compare_with_folder("tiny_ldm.safetensors", shared("tiny-sd/tiny_ldm.safetensors"), &QUIET, test_tiny_dir());
    else
        printf("  skip tiny_ldm.safetensors: %s not found (MS_SHARED)\n", shared("tiny-sd/tiny_ldm.safetensors"));
    test_model_b();
    test_adapter_file();
    test_default_model(argv[0]);
    test_install(argv[0]);
#if !defined(_WIN32)
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    if (system(cmd)) {}
#endif
    return test_summary("test_models");
}
