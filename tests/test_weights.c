/* tests/test_weights.c — configs, parameter tables, the diffusers <-> LDM key mapping and the
 * model loader.
 *
 * Independent references:
 *   - ../shared/models/sd15-configs/diffusers-keys.txt: the state_dict() keys and shapes of a real
 *     SD 1.5 (diffusers 0.19.3 built from the same config.json files), in state_dict order;
 *   - ldm-keys.txt: the same tensors converted to the original LDM layout by diffusers' own
 *     conversion functions;
 *   - tiny-sd: safetensors headers written by diffusers 0.19.3 (folder) and tiny_ldm.safetensors.
 * Without ../shared (MS_SHARED) those parts are skipped with a note.
 */
#include "tests/test.h"
#include "tools/tools.h"

#include <stdint.h>

static char g_path[2048];
static const char *shared(const char *rel) {
    snprintf(g_path, sizeof g_path, "%s/models/%s", test_shared_dir(), rel);
    return g_path;
}

static int have_shared(void) {
    FILE *f = fopen(shared("sd15-configs/diffusers-keys.txt"), "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* ---- key lists: "comp\tkey\t[a, b]" or "key\t[a, b]" ---- */
typedef struct { char comp[32]; char key[160]; int ndim; int64_t shape[8]; } KeyLine;

static int parse_shape(const char *s, int *ndim, int64_t *shape) {
    *ndim = 0;
    if (*s++ != '[') return 0;
    while (*s && *s != ']') {
        char *end;
        long long v = strtoll(s, &end, 10);
        if (end == s || *ndim >= 8) return 0;
        shape[(*ndim)++] = v;
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    return *s == ']';
}

static KeyLine *read_keys(const char *path, int with_comp, int *n) {
    FILE *f = fopen(path, "rb");
    char line[512];
    int cap = 2048;
    KeyLine *k = (KeyLine *)calloc((size_t)cap, sizeof *k);
    *n = 0;
    if (!f || !k) { if (f) fclose(f); free(k); return NULL; }
    while (fgets(line, sizeof line, f) && *n < cap) {
        KeyLine *e = &k[*n];
        char *t1 = strchr(line, '\t'), *t2;
        if (!t1) continue;
        *t1 = 0;
        if (with_comp) {
            t2 = strchr(t1 + 1, '\t');
            if (!t2) continue;
            *t2 = 0;
            if (strlen(line) >= sizeof e->comp || strlen(t1 + 1) >= sizeof e->key) continue;
            memcpy(e->comp, line, strlen(line) + 1);
            memcpy(e->key, t1 + 1, strlen(t1 + 1) + 1);
            if (!parse_shape(t2 + 1, &e->ndim, e->shape)) continue;
        } else {
            if (strlen(line) >= sizeof e->key) continue;
            memcpy(e->key, line, strlen(line) + 1);
            if (!parse_shape(t1 + 1, &e->ndim, e->shape)) continue;
        }
        (*n)++;
    }
    fclose(f);
    return k;
}

static int same_shape(int na, const int64_t *a, int nb, const int64_t *b) {
    if (na != nb) return 0;
    for (int i = 0; i < na; i++) if (a[i] != b[i]) return 0;
    return 1;
}

/* Compares a table with the lines of one component, in order. */
static void check_table_vs_list(const char *what, const MsParamTable *t, const KeyLine *k, int nk, const char *comp) {
    int j = 0, bad = 0;
    char s1[96], s2[96];
    for (int i = 0; i < nk; i++) {
        if (strcmp(k[i].comp, comp)) continue;
        if (j >= t->n) { if (!bad++) printf("      extra in list: %s\n", k[i].key); j++; continue; }
        const MsParam *p = &t->p[j++];
        if (strcmp(p->name, k[i].key) || !same_shape(p->ndim, p->shape, k[i].ndim, k[i].shape)) {
            if (!bad++)
                printf("      first difference at %d: table %s %s, list %s %s\n", j - 1, p->name,
                       ms_shape_str(s1, sizeof s1, p->ndim, p->shape), k[i].key,
                       ms_shape_str(s2, sizeof s2, k[i].ndim, k[i].shape));
        }
    }
    check(bad == 0 && j == t->n, "%s: %d table entries == %d %s keys of diffusers-keys.txt (names, shapes, order)",
          what, t->n, j, comp);
}

static JsonValue *load_json(const char *rel) {
    JsonValue *j = NULL;
    if (json_parse_file(shared(rel), &j)) { printf("  %s\n", ms_last_error()); return NULL; }
    return j;
}

/* ---- SD 1.5: configs and tables ---- */
static void test_sd15_configs_and_tables(void) {
    if (!have_shared()) { printf("  note: %s absent, SD 1.5 table tests skipped\n", shared("sd15-configs")); return; }
    UNetConfig u, u15; VaeConfig v, v15; ClipTextConfig c, c15; AdapterConfig as, ao, a15; SchedulerConfig sc, sc15;
    JsonValue *j;
    MsStatus s;
    j = load_json("sd15-configs/unet/config.json");
    s = ms_unet_config_from_json(j, &u); json_free(j);
    check(s == MS_OK, "SD 1.5 unet/config.json reads (%s)", s ? ms_last_error() : "ok");
    j = load_json("sd15-configs/vae/config.json");
    s = ms_vae_config_from_json(j, &v); json_free(j);
    check(s == MS_OK, "SD 1.5 vae/config.json reads (%s)", s ? ms_last_error() : "ok");
    j = load_json("sd15-configs/text_encoder/config.json");
    s = ms_clip_text_config_from_json(j, &c); json_free(j);
    check(s == MS_OK, "SD 1.5 text_encoder/config.json reads (%s)", s ? ms_last_error() : "ok");
    j = load_json("sd15-configs/t2iadapter_sketch/config.json");
    s = ms_adapter_config_from_json(j, &as); json_free(j);
    check(s == MS_OK && as.in_channels == 1, "sketch adapter config reads, in_channels 1");
    j = load_json("sd15-configs/t2iadapter_openpose/config.json");
    s = ms_adapter_config_from_json(j, &ao); json_free(j);
    check(s == MS_OK && ao.in_channels == 3, "openpose adapter config reads, in_channels 3");
    j = load_json("sd15-configs/scheduler/scheduler_config.json");
    s = ms_scheduler_config_from_json(j, &sc); json_free(j);
    check(s == MS_OK, "SD 1.5 scheduler_config.json reads (%s)", s ? ms_last_error() : "ok");

    /* the built-in SD 1.5 values (typed from the model card) against the real files */
    ms_unet_config_sd15(&u15); ms_vae_config_sd15(&v15); ms_clip_text_config_sd15(&c15);
    ms_adapter_config_sd15(&a15, 1); ms_scheduler_config_sd15(&sc15);
    check(!memcmp(&u, &u15, sizeof u), "ms_unet_config_sd15 == unet/config.json, every field");
    check(!memcmp(&v, &v15, sizeof v), "ms_vae_config_sd15 == vae/config.json, every field");
    check(!memcmp(&c, &c15, sizeof c), "ms_clip_text_config_sd15 == text_encoder/config.json, every field");
    check(!memcmp(&as, &a15, sizeof as), "ms_adapter_config_sd15(1) == t2iadapter_sketch/config.json");
    check(!memcmp(&sc, &sc15, sizeof sc), "ms_scheduler_config_sd15 == scheduler_config.json");
    check(sc.timestep_spacing == MS_SPACING_ABSENT && sc.prediction_type == MS_PRED_EPSILON &&
          sc.beta_schedule == MS_BETA_SCALED_LINEAR && sc.steps_offset == 1, "scheduler: no timestep_spacing key, "
          "epsilon, scaled_linear, steps_offset 1");
    check(ms_unet_heads(&u, 0) == 8 && ms_unet_time_embed_dim(&u) == 1280 && ms_unet_cross_attn_layers(&u) == 16,
          "SD 1.5: 8 heads, time embedding 1280, 16 cross-attention layers");

    int nk;
    KeyLine *k = read_keys(shared("sd15-configs/diffusers-keys.txt"), 1, &nk);
    check(k && nk == 1207, "diffusers-keys.txt: %d lines", nk);
    if (!k) return;
    MsParamTable t;
    if (!ms_param_table_unet(&u, &t)) {
        check_table_vs_list("unet", &t, k, nk, "unet");
        check(ms_param_table_numel(&t) == 859520964u, "unet parameters %zu == 859,520,964", ms_param_table_numel(&t));
        ms_param_table_free(&t);
    }
    if (!ms_param_table_vae(&v, &t)) {
        check_table_vs_list("vae", &t, k, nk, "vae");
        check(ms_param_table_numel(&t) == 83653863u, "vae parameters %zu == 83,653,863", ms_param_table_numel(&t));
        ms_param_table_free(&t);
    }
    if (!ms_param_table_text(&c, &t)) {
        check_table_vs_list("text_encoder", &t, k, nk, "text_encoder");
        check(ms_param_table_numel(&t) == 123060480u, "text parameters %zu == 123,060,480", ms_param_table_numel(&t));
        ms_param_table_free(&t);
    }
    if (!ms_param_table_adapter(&as, &t)) {
        check_table_vs_list("sketch", &t, k, nk, "t2iadapter_sketch");
        check(ms_param_table_numel(&t) == 77000640u, "sketch parameters %zu == 77,000,640", ms_param_table_numel(&t));
        ms_param_table_free(&t);
    }
    if (!ms_param_table_adapter(&ao, &t)) {
        check_table_vs_list("openpose", &t, k, nk, "t2iadapter_openpose");
        ms_param_table_free(&t);
    }
    free(k);
}

/* Every key of an LDM list maps to exactly one table entry with the same (LDM) shape, and every
 * table entry is hit once. Returns the number of harmless keys. */
static void check_ldm_bijection(const char *what, MsParamTable *tabs, int ntab, const KeyLine *k, int nk) {
    int harmless = 0, unmapped = 0, multi = 0, badshape = 0, dup = 0, total = 0;
    char s1[96], s2[96];
    int *hits[3] = { NULL, NULL, NULL };
    for (int a = 0; a < ntab; a++) { hits[a] = (int *)calloc((size_t)tabs[a].n + 1, sizeof(int)); total += tabs[a].n; }
    for (int i = 0; i < nk; i++) {
        int found = 0, ta = -1, idx = -1;
        for (int a = 0; a < ntab; a++) {
            int x = ms_param_find_ldm(&tabs[a], k[i].key);
            if (x >= 0) { found++; ta = a; idx = x; }
        }
        if (!found) {
            if (ms_ldm_key_is_harmless(k[i].key)) { harmless++; continue; }
            if (!unmapped++) printf("      unmapped LDM key: %s\n", k[i].key);
            continue;
        }
        if (found > 1) { multi++; continue; }
        const MsParam *p = &tabs[ta].p[idx];
        int64_t ls[4] = { p->shape[0], p->shape[1], p->shape[2], p->shape[3] };
        if (p->ldm_ndim == 4 && p->ndim == 2) ls[2] = ls[3] = 1;
        if (!same_shape(p->ldm_ndim, ls, k[i].ndim, k[i].shape)) {
            if (!badshape++)
                printf("      shape: %s is %s in the list, %s mapped (%s)\n", k[i].key,
                       ms_shape_str(s1, sizeof s1, k[i].ndim, k[i].shape), ms_shape_str(s2, sizeof s2, p->ldm_ndim, ls),
                       p->name);
        }
        if (hits[ta][idx]++) dup++;
    }
    int missed = 0;
    for (int a = 0; a < ntab; a++)
        for (int i = 0; i < tabs[a].n; i++)
            if (!hits[a][i] && !missed++) printf("      table entry without LDM key: %s (%s)\n", tabs[a].p[i].ldm, tabs[a].p[i].name);
    check(!unmapped && !multi && !badshape && !dup && !missed,
          "%s: %d LDM keys -> %d table entries, one to one, same shapes (%d harmless non-parameters; unmapped %d, "
          "ambiguous %d, shape %d, duplicate %d, missed %d)", what, nk - harmless, total, harmless, unmapped, multi,
          badshape, dup, missed);
    for (int a = 0; a < ntab; a++) free(hits[a]);
}

static void test_sd15_ldm_mapping(void) {
    if (!have_shared()) return;
    UNetConfig u; VaeConfig v; ClipTextConfig c;
    ms_unet_config_sd15(&u); ms_vae_config_sd15(&v); ms_clip_text_config_sd15(&c);
    MsParamTable t[3];
    if (ms_param_table_unet(&u, &t[0]) || ms_param_table_vae(&v, &t[1]) || ms_param_table_text(&c, &t[2])) {
        check(0, "SD 1.5 tables: %s", ms_last_error());
        return;
    }
    int nk;
    KeyLine *k = read_keys(shared("sd15-configs/ldm-keys.txt"), 0, &nk);
    check(k && nk == 1134, "ldm-keys.txt: %d lines", nk);
    if (k) check_ldm_bijection("SD 1.5 LDM", t, 3, k, nk);
    /* a few fixed points of diffusers' convert_from_ckpt.py */
    static const char *const pairs[][2] = {
        { "model.diffusion_model.input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight" },
        { "model.diffusion_model.input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight" },
        { "model.diffusion_model.output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight" },
        { "model.diffusion_model.output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias" },
        { "model.diffusion_model.middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight" },
        { "model.diffusion_model.output_blocks.11.0.skip_connection.weight", "up_blocks.3.resnets.2.conv_shortcut.weight" },
        { "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", "decoder.up_blocks.3.resnets.0.conv_shortcut.weight" },
        { "first_stage_model.decoder.up.3.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight" },
        { "first_stage_model.encoder.mid.attn_1.proj_out.weight", "encoder.mid_block.attentions.0.to_out.0.weight" },
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        int a = pairs[i][0][0] == 'm' ? 0 : 1;
        int x = ms_param_find_ldm(&t[a], pairs[i][0]);
        if (x < 0 || strcmp(t[a].p[x].name, pairs[i][1])) { ok = 0; printf("      %s -> %s\n", pairs[i][0], x < 0 ? "?" : t[a].p[x].name); }
    }
    check(ok, "fixed points of convert_ldm_unet/vae_checkpoint");
    int q = ms_param_find(&t[1], "decoder.mid_block.attentions.0.query.weight");
    check(q >= 0 && !strcmp(t[1].p[q].name, "decoder.mid_block.attentions.0.to_q.weight"),
          "older diffusers VAE name query -> to_q");
    char buf[MS_KEY_MAX];
    check(ms_ldm_key_normalize("cond_stage_model.transformer.encoder.layers.3.mlp.fc1.bias", buf, sizeof buf) == 1 &&
          ms_param_find_ldm(&t[2], buf) >= 0, "legacy cond_stage_model.transformer.encoder.* key maps");
    free(k);
    for (int a = 0; a < 3; a++) ms_param_table_free(&t[a]);
}

/* ---- tiny-sd: tables vs the files, folder vs LDM single file ---- */
static int read_tiny_configs(UNetConfig *u, VaeConfig *v, ClipTextConfig *c) {
    JsonValue *j;
    MsStatus s = MS_OK;
    if ((j = load_json("tiny-sd/unet/config.json"))) s = ms_unet_config_from_json(j, u); else s = MS_ERR_IO;
    json_free(j);
    if (!s) { if ((j = load_json("tiny-sd/vae/config.json"))) s = ms_vae_config_from_json(j, v); else s = MS_ERR_IO; json_free(j); }
    if (!s) { if ((j = load_json("tiny-sd/text_encoder/config.json"))) s = ms_clip_text_config_from_json(j, c); else s = MS_ERR_IO; json_free(j); }
    return s == MS_OK;
}

/* every tensor of the file is in the table with that shape, and the counts match */
static void check_table_vs_st(const char *what, const MsParamTable *t, const char *path, int ldm) {
    StFile f;
    char s1[96], s2[96];
    if (st_open(&f, path)) { check(0, "%s: %s", what, ms_last_error()); st_close(&f); return; }
    int bad = 0, n = 0;
    for (size_t i = 0; i < f.count; i++) {
        const StTensor *x = &f.tensors[i];
        int idx = ldm ? ms_param_find_ldm(t, x->name) : ms_param_find(t, x->name);
        if (idx < 0) continue;
        n++;
        const MsParam *p = &t->p[idx];
        int64_t ls[4] = { p->shape[0], p->shape[1], p->shape[2], p->shape[3] };
        if (ldm && p->ldm_ndim == 4 && p->ndim == 2) ls[2] = ls[3] = 1;
        if (!same_shape(ldm ? p->ldm_ndim : p->ndim, ls, x->ndim, x->shape) && !bad++)
            printf("      %s: file %s, table %s\n", x->name, ms_shape_str(s1, sizeof s1, x->ndim, x->shape),
                   ms_shape_str(s2, sizeof s2, ldm ? p->ldm_ndim : p->ndim, ls));
    }
    if (!ldm) check(!bad && n == t->n && (size_t)n == f.count, "%s: %d table entries, %zu tensors in the file, all "
                    "matched with their shapes", what, t->n, f.count);
    else check(!bad && n == t->n, "%s: %d table entries found in %s with LDM shapes", what, t->n, path);
    st_close(&f);
}

static void test_tiny(void) {
    if (!have_shared()) { printf("  note: tiny-sd absent, loader tests skipped\n"); return; }
    UNetConfig u; VaeConfig v; ClipTextConfig c;
    if (!check(read_tiny_configs(&u, &v, &c), "tiny-sd configs read")) return;
    MsParamTable t[3];
    if (ms_param_table_unet(&u, &t[0]) || ms_param_table_vae(&v, &t[1]) || ms_param_table_text(&c, &t[2])) {
        check(0, "tiny tables: %s", ms_last_error());
        return;
    }
    check(t[0].n == 684 && t[1].n == 244 && t[2].n == 3 + 16 * 2 + 2, "tiny tables: unet %d (684), vae %d (244), "
          "text %d (37)", t[0].n, t[1].n, t[2].n);
    check(ms_param_table_numel(&t[0]) == 3222692u && ms_param_table_numel(&t[1]) == 1732679u &&
          ms_param_table_numel(&t[2]) == 1608992u, "tiny parameter counts match MANIFEST.json");
    check_table_vs_st("tiny unet", &t[0], shared("tiny-sd/unet/diffusion_pytorch_model.safetensors"), 0);
    check_table_vs_st("tiny vae", &t[1], shared("tiny-sd/vae/diffusion_pytorch_model.safetensors"), 0);
    check_table_vs_st("tiny text", &t[2], shared("tiny-sd/text_encoder/model.safetensors"), 0);
    StFile f;
    if (!st_open(&f, shared("tiny-sd/tiny_ldm.safetensors"))) {
        int nk = (int)f.count;
        KeyLine *k = (KeyLine *)calloc((size_t)nk, sizeof *k);
        for (int i = 0; k && i < nk; i++) {
            snprintf(k[i].key, sizeof k[i].key, "%s", f.tensors[i].name);
            k[i].ndim = f.tensors[i].ndim;
            for (int d = 0; d < k[i].ndim; d++) k[i].shape[d] = f.tensors[i].shape[d];
        }
        check(nk == 968, "tiny_ldm.safetensors: %d tensors (968)", nk);
        if (k) check_ldm_bijection("tiny LDM", t, 3, k, nk);
        free(k);
    }
    st_close(&f);
    for (int a = 0; a < 3; a++) ms_param_table_free(&t[a]);

    /* adapters */
    AdapterConfig ac;
    MsParamTable at;
    MsStatus s = ms_adapter_load(shared("tiny-sd/t2iadapter_sketch"), NULL, &ac, &at);
    check(s == MS_OK && at.n == 36 && ac.in_channels == 1, "tiny sketch adapter loads: %d tensors (%s)", at.n,
          s ? ms_last_error() : "ok");
    ms_param_table_free(&at);

    /* the same model from the folder and from the single file */
    MsModel a, b;
    MsLoadOptions lo = { 0, NULL };
    double t0 = ms_time();
    s = ms_model_load(shared("tiny-sd"), NULL, &a);
    double t1 = ms_time();
    if (!check(s == MS_OK, "tiny-sd folder loads (%s) in %.1f ms", s ? ms_last_error() : "ok", 1e3 * (t1 - t0))) return;
    lo.config_dir = shared("tiny-sd");
    char dir[2048];
    snprintf(dir, sizeof dir, "%s", lo.config_dir);
    lo.config_dir = dir;
    t0 = ms_time();
    s = ms_model_load(shared("tiny-sd/tiny_ldm.safetensors"), &lo, &b);
    t1 = ms_time();
    if (!check(s == MS_OK, "tiny_ldm.safetensors loads with tiny-sd configs (%s) in %.1f ms", s ? ms_last_error() : "ok",
               1e3 * (t1 - t0))) { ms_model_free(&a); return; }
    MsParamTable *ta[3] = { &a.unet, &a.vae, &a.text }, *tb[3] = { &b.unet, &b.vae, &b.text };
    const char *names[3] = { "unet", "vae", "text_encoder" };
    for (int m = 0; m < 3; m++) {
        size_t nbad = 0, nvals = 0, nkeys = 0;
        for (int i = 0; i < ta[m]->n; i++) {
            const MsParam *p = &ta[m]->p[i], *q = &tb[m]->p[i];
            if (p->flags & MS_PARAM_BUFFER) continue;
            nkeys++;
            nvals += p->numel;
            if (!p->f32 || !q->f32 || memcmp(p->f32, q->f32, p->numel * sizeof(float))) {
                if (!nbad++) printf("      first difference: %s\n", p->name);
            }
        }
        check(nbad == 0 && nkeys > 0, "%s: folder == LDM single file, bit-identical (%zu keys, %zu values)", names[m],
              nkeys, nvals);
    }
    /* without a config the single file is measured against SD 1.5 and refused clearly */
    ms_model_free(&b);
    s = ms_model_load(shared("tiny-sd/tiny_ldm.safetensors"), NULL, &b);
    check(s == MS_ERR_SHAPE && strstr(ms_last_error(), "tiny_ldm.safetensors") && strstr(ms_last_error(), "expected"),
          "tiny_ldm.safetensors against the SD 1.5 defaults: refused");
    printf("      message: %s\n", ms_last_error());

    /* keep_half on a half file: build an F16 copy of the tiny text encoder in memory */
    {
        MsParamTable *tt = &a.text;
        StEntry *e = (StEntry *)calloc((size_t)tt->n, sizeof *e);
        int ne = 0;
        for (int i = 0; e && i < tt->n; i++) {
            if (tt->p[i].flags & MS_PARAM_BUFFER) continue;
            e[ne].name = tt->p[i].name; e[ne].dtype = i % 2 ? ST_F16 : ST_BF16; e[ne].ndim = tt->p[i].ndim;
            for (int d = 0; d < tt->p[i].ndim; d++) e[ne].shape[d] = tt->p[i].shape[d];
            e[ne].f32 = tt->p[i].f32;
            ne++;
        }
        unsigned char *img = NULL;
        size_t sz = 0;
        ClipTextConfig cc = a.text_config;
        MsParamTable th;
        MsLoadOptions half = { 1, NULL };
        if (e && !st_write_memory(e, (size_t)ne, NULL, 0, &img, &sz) && !ms_param_table_text(&cc, &th)) {
            s = ms_table_fill_memory(&th, img, sz, "text_f16.safetensors", 0, "text_encoder", &half);
            int ok = s == MS_OK, kept = 0;
            float *buf = (float *)malloc(tt->p[0].numel * sizeof(float));
            for (int i = 0; ok && buf && i < th.n; i++) {
                const MsParam *p = &th.p[i];
                if (p->flags & MS_PARAM_BUFFER) continue;
                kept += p->half != NULL && p->f32 == NULL;
                ms_param_get_f32(p, buf);
                for (size_t x = 0; x < p->numel; x++) {
                    float w = i % 2 ? st_f16_to_f32(st_f32_to_f16(tt->p[i].f32[x])) : st_bf16_to_f32(st_f32_to_bf16(tt->p[i].f32[x]));
                    if (memcmp(&w, &buf[x], 4)) { ok = 0; printf("      %s[%zu]: %g vs %g\n", p->name, x, (double)buf[x], (double)w); break; }
                }
            }
            check(ok && kept == ne, "keep_half: %d F16/BF16 tensors kept 16-bit, ms_param_get_f32 == rounded f32 "
                  "exactly (%s)", kept, s ? ms_last_error() : "ok");
            free(buf);
            ms_param_table_free(&th);
        }
        free(img);
        free(e);
    }
    ms_model_free(&a);
    ms_model_free(&b);
}


/* ---- PyTorch pickles: the tiny model re-saved as an LDM .ckpt (under "state_dict", with an
 * optimizer entry beside it) and the text encoder as a diffusers .bin with F16 tensors ---- */
static char g_dir[1024] = ".";

static void test_pickles(void) {
    if (!have_shared()) return;
    MsModel a, b;
    MsLoadOptions lo = { 0, NULL };
    char cfg[2048], ckpt[1200], bin[1200];
    snprintf(cfg, sizeof cfg, "%s", shared("tiny-sd"));
    snprintf(ckpt, sizeof ckpt, "%s/test_weights_tiny.ckpt", g_dir);
    snprintf(bin, sizeof bin, "%s/test_weights_text.bin", g_dir);
    if (!check(ms_model_load(cfg, NULL, &a) == MS_OK, "tiny folder for the pickle tests")) return;
    StFile f;
    if (st_open(&f, shared("tiny-sd/tiny_ldm.safetensors"))) { st_close(&f); ms_model_free(&a); return; }
    PthSaveTensor *pt = (PthSaveTensor *)calloc(f.count + 1, sizeof *pt);
    char (*names)[200] = (char (*)[200])calloc(f.count + 1, 200);
    void **bufs = (void **)calloc(f.count + 1, sizeof(void *));
    size_t n = 0;
    for (size_t i = 0; pt && names && bufs && i < f.count; i++, n++) {
        const StTensor *x = &f.tensors[i];
        snprintf(names[n], 200, "state_dict.%s", x->name);
        pt[n].name = names[n]; pt[n].nest = 1; pt[n].ndim = x->ndim;
        for (int d = 0; d < x->ndim; d++) pt[n].shape[d] = x->shape[d];
        if (x->dtype == ST_F32) {
            float *v = (float *)malloc(x->numel * sizeof(float) + 1);
            st_to_f32(&f, x, v, x->numel);
            pt[n].dtype = PTH_F32; pt[n].data = bufs[n] = v;
        } else {   /* position_ids: I64 */
            int64_t *v = (int64_t *)malloc(x->numel * sizeof(int64_t) + 1);
            for (size_t e = 0; e < x->numel; e++) v[e] = (int64_t)e;
            pt[n].dtype = PTH_I64; pt[n].data = bufs[n] = v;
        }
    }
    float junk[4] = { 1, 2, 3, 4 };
    pt[n].name = "optimizer_states.exp_avg"; pt[n].nest = 1; pt[n].dtype = PTH_F32; pt[n].ndim = 1;
    pt[n].shape[0] = 4; pt[n].data = junk; n++;
    MsStatus s = pth_save(ckpt, pt, n);
    if (check(s == MS_OK, "write %s (%zu tensors) (%s)", ckpt, n, s ? ms_last_error() : "ok")) {
        lo.config_dir = cfg;
        s = ms_model_load(ckpt, &lo, &b);
        if (check(s == MS_OK, ".ckpt (zip pickle, weights under state_dict) loads (%s)", s ? ms_last_error() : "ok")) {
            MsParamTable *ta[3] = { &a.unet, &a.vae, &a.text }, *tb[3] = { &b.unet, &b.vae, &b.text };
            size_t nbad = 0, nk = 0;
            for (int m = 0; m < 3; m++)
                for (int i = 0; i < ta[m]->n; i++) {
                    if (ta[m]->p[i].flags & MS_PARAM_BUFFER) continue;
                    nk++;
                    if (memcmp(ta[m]->p[i].f32, tb[m]->p[i].f32, ta[m]->p[i].numel * 4)) nbad++;
                }
            check(nbad == 0, ".ckpt == folder, bit-identical (%zu keys)", nk);
            ms_model_free(&b);
        }
    }
    remove(ckpt);
    for (size_t i = 0; i < n; i++) free(bufs[i]);

    /* text encoder as a diffusers pytorch_model.bin, F16 and BF16 alternating */
    MsParamTable *tt = &a.text, th;
    n = 0;
    for (int i = 0; i < tt->n; i++) {
        const MsParam *p = &tt->p[i];
        if (p->flags & MS_PARAM_BUFFER) continue;
        uint16_t *h = (uint16_t *)malloc(p->numel * 2 + 2);
        for (size_t e = 0; e < p->numel; e++) h[e] = i % 2 ? st_f32_to_f16(p->f32[e]) : st_f32_to_bf16(p->f32[e]);
        pt[n].name = p->name; pt[n].nest = 0; pt[n].dtype = i % 2 ? PTH_F16 : PTH_BF16; pt[n].ndim = p->ndim;
        for (int d = 0; d < p->ndim; d++) pt[n].shape[d] = p->shape[d];
        pt[n].data = bufs[n] = h; pt[n].requires_grad = 1;
        n++;
    }
    s = pth_save(bin, pt, n);
    if (check(s == MS_OK, "write %s (%s)", bin, s ? ms_last_error() : "ok") && !ms_param_table_text(&a.text_config, &th)) {
        s = ms_table_fill_file(&th, bin, 0, "text_encoder", NULL);
        int ok = s == MS_OK;
        for (int i = 0; ok && i < th.n; i++) {
            const MsParam *p = &th.p[i];
            if (p->flags & MS_PARAM_BUFFER) continue;
            for (size_t e = 0; ok && e < p->numel; e++) {
                float w = i % 2 ? st_f16_to_f32(st_f32_to_f16(tt->p[i].f32[e])) : st_bf16_to_f32(st_f32_to_bf16(tt->p[i].f32[e]));
                ok = !memcmp(&w, &p->f32[e], 4);
            }
        }
        check(ok, "pytorch_model.bin with F16/BF16 tensors (requires_grad) loads as the rounded f32 values, exactly (%s)",
              s ? ms_last_error() : "ok");
        ms_param_table_free(&th);
    }
    remove(bin);
    for (size_t i = 0; i < n; i++) free(bufs[i]);
    free(bufs); free(names); free(pt);
    st_close(&f);
    ms_model_free(&a);
}


/* ---- mixshow convert: folder -> LDM file -> folder, each loaded back and compared ---- */
static void test_convert(void) {
    if (!have_shared()) return;
    char in[2048], ldm[1200], dir[1200], cfg[2048];
    snprintf(in, sizeof in, "%s", shared("tiny-sd"));
    snprintf(cfg, sizeof cfg, "%s", in);
    snprintf(ldm, sizeof ldm, "%s/test_weights_conv.safetensors", g_dir);
    snprintf(dir, sizeof dir, "%s/test_weights_conv_dir", g_dir);
    char *av1[] = { "convert", in, ldm, NULL };
    int rc = cmd_convert(3, av1);
    MsModel a, b;
    if (ms_model_load(in, NULL, &a)) { check(0, "%s", ms_last_error()); return; }
    StFile f, g;
    if (check(rc == 0, "convert tiny-sd -> LDM .safetensors") && !st_open(&f, ldm)) {
        int same = 1;
        if (!st_open(&g, shared("tiny-sd/tiny_ldm.safetensors"))) {
            size_t k = 0;
            for (size_t i = 0; i < g.count; i++) {
                if (ms_ldm_key_is_harmless(g.tensors[i].name)) continue;
                const StTensor *x = st_find(&f, g.tensors[i].name);
                k++;
                if (!x || x->ndim != g.tensors[i].ndim || x->dtype != g.tensors[i].dtype ||
                    memcmp(x->shape, g.tensors[i].shape, (size_t)x->ndim * sizeof(int64_t)) ||
                    memcmp(x->data, g.tensors[i].data, x->nbytes)) { same = 0; printf("      differs: %s\n", g.tensors[i].name); break; }
            }
            check(same && k == f.count, "written LDM file == tiny_ldm.safetensors: %zu tensors, names, dtypes, "
                  "shapes, bytes (schedule buffers aside)", f.count);
        }
        st_close(&g);
    }
    st_close(&f);
    char *av2[] = { "convert", ldm, dir, "--config", cfg, NULL };
    rc = cmd_convert(5, av2);
    if (check(rc == 0, "convert LDM file -> diffusers folder") && !ms_model_load(dir, NULL, &b)) {
        MsParamTable *ta[3] = { &a.unet, &a.vae, &a.text }, *tb[3] = { &b.unet, &b.vae, &b.text };
        size_t nbad = 0;
        for (int m = 0; m < 3; m++)
            for (int i = 0; i < ta[m]->n; i++)
                if (ta[m]->p[i].f32 && memcmp(ta[m]->p[i].f32, tb[m]->p[i].f32, ta[m]->p[i].numel * 4)) nbad++;
        check(nbad == 0 && !memcmp(&a.unet_config, &b.unet_config, sizeof a.unet_config) &&
              !memcmp(&a.vae_config, &b.vae_config, sizeof a.vae_config) &&
              !memcmp(&a.text_config, &b.text_config, sizeof a.text_config) &&
              !memcmp(&a.scheduler_config, &b.scheduler_config, sizeof a.scheduler_config),
              "round trip folder -> LDM -> folder: configs and parameters identical");
        ms_model_free(&b);
    }
    char *av3[] = { "convert", in, dir, NULL };
    check(cmd_convert(3, av3) == 1, "convert refuses an existing output folder");
    /* clean up */
    static const char *const files[] = { "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
        "text_encoder/model.safetensors", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet", "vae", "text_encoder", "scheduler",
        "tokenizer", "" };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char p[1400];
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        remove(p);
    }
    remove(dir);
    remove(ldm);
    ms_model_free(&a);
}

/* ---- bad files, built in memory around a small adapter table ---- */
static MsStatus fill_from(const AdapterConfig *ac, StEntry *e, size_t n, int ldm, MsParamTable *t) {
    unsigned char *img = NULL;
    size_t sz = 0;
    MsStatus s = st_write_memory(e, n, NULL, 0, &img, &sz);
    if (s) return s;
    if (!(s = ms_param_table_adapter(ac, t))) {
        s = ms_table_fill_memory(t, img, sz, "bad.safetensors", ldm, "t2iadapter", NULL);
        if (s) ms_param_table_free(t);        /* the message stays in ms_last_error() */
    }
    free(img);
    return s;
}

static void test_bad_files(void) {
    AdapterConfig ac;
    MsParamTable t, ref;
    ms_adapter_config_sd15(&ac, 1);
    ac.channels[0] = 4; ac.channels[1] = 8; ac.channels[2] = 8; ac.channels[3] = 8;
    ac.downscale_factor = 2;
    if (ms_param_table_adapter(&ac, &ref)) { check(0, "%s", ms_last_error()); return; }
    StEntry *e = (StEntry *)calloc((size_t)ref.n + 2, sizeof *e);
    float *vals = test_zeros(8 * 8 * 9 * 4);
    MsRng r;
    ms_rng_seed(&r, 7);
    ms_rng_fill_normal(&r, vals, 8 * 8 * 9 * 4, 0.0f, 1.0f);
    for (int i = 0; i < ref.n; i++) {
        e[i].name = ref.p[i].name; e[i].dtype = ST_F32; e[i].ndim = ref.p[i].ndim;
        for (int d = 0; d < ref.p[i].ndim; d++) e[i].shape[d] = ref.p[i].shape[d];
        e[i].f32 = vals;
    }
    int n = ref.n;
    MsStatus s = fill_from(&ac, e, (size_t)n, 0, &t);
    int ok = s == MS_OK;
    for (int i = 0; ok && i < t.n; i++) ok = !memcmp(t.p[i].f32, vals, t.p[i].numel * sizeof(float));
    check(ok, "good in-memory adapter file loads, values exact (%d tensors)", n);
    ms_param_table_free(&t);

    /* mis-shaped */
    e[3].shape[0] += 1;
    s = fill_from(&ac, e, (size_t)n, 0, &t);
    check(s == MS_ERR_SHAPE && strstr(ms_last_error(), ref.p[3].name) && strstr(ms_last_error(), "bad.safetensors"),
          "mis-shaped tensor refused: %s", ms_last_error());
    e[3].shape[0] -= 1;
    /* missing */
    StEntry keep = e[5];
    e[5] = e[n - 1];
    s = fill_from(&ac, e, (size_t)n - 1, 0, &t);
    check(s == MS_ERR_FORMAT && strstr(ms_last_error(), keep.name) && strstr(ms_last_error(), "missing"),
          "missing tensor refused: %s", ms_last_error());
    e[5] = keep;
    /* extra */
    e[n] = e[0];
    e[n].name = "adapter.body.9.extra.weight";
    s = fill_from(&ac, e, (size_t)n + 1, 0, &t);
    check(s == MS_ERR_FORMAT && strstr(ms_last_error(), "adapter.body.9.extra.weight") && strstr(ms_last_error(), "unexpected"),
          "extra tensor refused: %s", ms_last_error());
    /* integer dtype for a parameter */
    e[2].dtype = ST_I32; e[2].f32 = NULL;
    {
        int32_t *iv = (int32_t *)calloc(ref.p[2].numel, sizeof(int32_t));
        e[2].raw = iv;
        s = fill_from(&ac, e, (size_t)n, 0, &t);
        check(s == MS_ERR_FORMAT && strstr(ms_last_error(), "I32"), "integer parameter refused: %s", ms_last_error());
        free(iv);
    }
    e[2].dtype = ST_F32; e[2].f32 = vals; e[2].raw = NULL;
    /* LDM (TencentARC) names, with harmless extras that are skipped */
    for (int i = 0; i < n; i++) e[i].name = ref.p[i].ldm;
    e[n] = e[0]; e[n].name = "betas"; e[n].ndim = 1; e[n].shape[0] = 10;
    e[n + 1] = e[n]; e[n + 1].name = "model_ema.decay"; e[n + 1].ndim = 0;
    s = fill_from(&ac, e, (size_t)n + 2, 1, &t);
    check(s == MS_OK, "original-layout names + betas + model_ema.decay load (%s)", s ? ms_last_error() : "ok");
    ms_param_table_free(&t);
    free(e);
    ms_free_aligned(vals);
    ms_param_table_free(&ref);

    /* duplicates: VAE attention under its new and its old name */
    VaeConfig v;
    ms_vae_config_sd15(&v);
    v.n_blocks = 1; v.block_out_channels[0] = 8; v.norm_num_groups = 4; v.layers_per_block = 1;
    MsParamTable vt;
    if (!ms_param_table_vae(&v, &vt)) {
        StEntry *ve = (StEntry *)calloc((size_t)vt.n + 1, sizeof *ve);
        float *big = test_zeros(8 * 8 * 9);
        for (int i = 0; i < vt.n; i++) {
            ve[i].name = vt.p[i].name; ve[i].dtype = ST_F32; ve[i].ndim = vt.p[i].ndim; ve[i].f32 = big;
            for (int d = 0; d < vt.p[i].ndim; d++) ve[i].shape[d] = vt.p[i].shape[d];
        }
        int q = ms_param_find(&vt, "encoder.mid_block.attentions.0.to_q.weight");
        ve[vt.n] = ve[q];
        ve[vt.n].name = "encoder.mid_block.attentions.0.query.weight";
        unsigned char *img = NULL;
        size_t sz = 0;
        MsParamTable t2;
        if (!st_write_memory(ve, (size_t)vt.n + 1, NULL, 0, &img, &sz) && !ms_param_table_vae(&v, &t2)) {
            s = ms_table_fill_memory(&t2, img, sz, "dup.safetensors", 0, "vae", NULL);
            check(s == MS_ERR_FORMAT && strstr(ms_last_error(), "query"), "to_q and query together refused: %s",
                  ms_last_error());
            ms_param_table_free(&t2);
        }
        free(img);
        /* old names alone load; a 1x1-conv shaped attention weight is accepted */
        ve[q].name = "encoder.mid_block.attentions.0.query.weight";
        ve[q].ndim = 4; ve[q].shape[2] = ve[q].shape[3] = 1;
        if (!st_write_memory(ve, (size_t)vt.n, NULL, 0, &img, &sz) && !ms_param_table_vae(&v, &t2)) {
            s = ms_table_fill_memory(&t2, img, sz, "old.safetensors", 0, "vae", NULL);
            check(s == MS_OK, "older diffusers name 'query' with a [C,C,1,1] weight loads (%s)", s ? ms_last_error() : "ok");
            ms_param_table_free(&t2);
        }
        free(img);
        free(ve);
        ms_free_aligned(big);
        ms_param_table_free(&vt);
    }
}

/* ---- config validation ---- */
static void test_config_checks(void) {
    UNetConfig u;
    MsParamTable t;
    ms_unet_config_sd15(&u);
    u.norm_num_groups = 30;
    MsStatus s = ms_param_table_unet(&u, &t);
    check(s == MS_ERR_ARG && strstr(ms_last_error(), "norm_num_groups"), "channels %% groups refused: %s", ms_last_error());
    ms_unet_config_sd15(&u);
    u.attention_head_dim[1] = 7;
    s = ms_unet_config_check(&u);
    check(s == MS_ERR_ARG && strstr(ms_last_error(), "heads"), "channels %% heads refused: %s", ms_last_error());
    ms_unet_config_sd15(&u);
    u.up_block_types[0] = MS_BLOCK_DOWN;
    s = ms_unet_config_check(&u);
    check(s == MS_ERR_UNSUPPORTED, "a down block in the up path refused: %s", ms_last_error());
    ms_unet_config_sd15(&u);
    u.use_linear_projection = 1;
    u.transformer_layers_per_block[2] = 2;
    if (!ms_param_table_unet(&u, &t)) {
        int i = ms_param_find(&t, "down_blocks.0.attentions.0.proj_in.weight");
        int k = ms_param_find_ldm(&t, "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight");
        check(i >= 0 && t.p[i].ndim == 2 && k >= 0 && t.p[k].shape[1] == 768 &&
              ms_unet_cross_attn_layers(&u) == 16 + 2 + 3,
              "use_linear_projection: proj_in Linear [C,C]; 2 transformer layers at level 2 -> 21 cross-attention layers (down +2, up +3)");
        ms_param_table_free(&t);
    }
    AdapterConfig a;
    ms_adapter_config_sd15(&a, 3);
    a.adapter_type = MS_ADAPTER_LIGHT;
    check(ms_adapter_config_check(&a) == MS_ERR_UNSUPPORTED, "light_adapter refused: %s", ms_last_error());
    ClipTextConfig c;
    ms_clip_text_config_sd15(&c);
    c.num_attention_heads = 10;
    check(ms_clip_text_config_check(&c) == MS_ERR_ARG, "text hidden %% heads refused: %s", ms_last_error());

    static const char *bad_json[] = {
        "{\"block_out_channels\":[32,64],\"down_block_types\":[\"CrossAttnDownBlock2D\",\"DownBlock2D\"],"
        "\"up_block_types\":[\"UpBlock2D\",\"CrossAttnUpBlock2D\"],\"class_embed_type\":\"timestep\"}",
        "{\"block_out_channels\":[32,64],\"down_block_types\":[\"CrossAttnDownBlock2D\",\"SimpleDown\"],"
        "\"up_block_types\":[\"UpBlock2D\",\"CrossAttnUpBlock2D\"]}",
        "{\"block_out_channels\":[32,64],\"down_block_types\":[\"CrossAttnDownBlock2D\",\"DownBlock2D\"],"
        "\"up_block_types\":[\"UpBlock2D\",\"CrossAttnUpBlock2D\"],\"attention_head_dim\":[2,2,2]}",
        "{\"block_out_channels\":[32,64],\"down_block_types\":[\"CrossAttnDownBlock2D\",\"DownBlock2D\"],"
        "\"up_block_types\":[\"UpBlock2D\",\"CrossAttnUpBlock2D\"],\"norm_num_groups\":\"eight\"}",
    };
    for (size_t i = 0; i < sizeof bad_json / sizeof bad_json[0]; i++) {
        JsonValue *j = NULL;
        if (json_parse(bad_json[i], strlen(bad_json[i]), "bad_unet.json", &j)) { check(0, "parse"); continue; }
        s = ms_unet_config_from_json(j, &u);
        check(s != MS_OK && strstr(ms_last_error(), "bad_unet.json:"), "bad unet config %zu refused: %s", i, ms_last_error());
        json_free(j);
    }
    const char *good = "{\"block_out_channels\":[32,64],\"down_block_types\":[\"CrossAttnDownBlock2D\",\"DownBlock2D\"],"
                       "\"up_block_types\":[\"UpBlock2D\",\"CrossAttnUpBlock2D\"],\"attention_head_dim\":[2,4],"
                       "\"norm_num_groups\":8,\"cross_attention_dim\":16}";
    JsonValue *j = NULL;
    if (!json_parse(good, strlen(good), "u.json", &j)) {
        s = ms_unet_config_from_json(j, &u);
        check(s == MS_OK && ms_unet_heads(&u, 1) == 4 && ms_unet_heads(&u, 0) == 2 && u.layers_per_block == 2,
              "per-block attention_head_dim list, defaults for missing keys (%s)", s ? ms_last_error() : "ok");
        if (!s && !ms_param_table_unet(&u, &t)) {
            /* the up path reverses per-level values: up block 1 sits at level 0 */
            check(ms_param_find(&t, "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight") >= 0 &&
                  ms_param_find(&t, "up_blocks.0.attentions.0.norm.weight") < 0 &&
                  ms_param_find_ldm(&t, "model.diffusion_model.output_blocks.2.1.conv.weight") >= 0 &&
                  ms_param_find_ldm(&t, "model.diffusion_model.input_blocks.3.0.op.weight") >= 0,
                  "2-level UNet: LDM indices derived from the block counts");
            ms_param_table_free(&t);
        }
    }
    json_free(j);
}

int main(int argc, char **argv) {
    if (argc > 0 && argv[0] && strrchr(argv[0], '/')) {       /* scratch files go next to the binary */
        size_t k = (size_t)(strrchr(argv[0], '/') - argv[0]);
        if (k < sizeof g_dir) { memcpy(g_dir, argv[0], k); g_dir[k] = 0; }
    }
    test_config_checks();
    test_sd15_configs_and_tables();
    test_sd15_ldm_mapping();
    test_tiny();
    test_pickles();
    test_convert();
    test_bad_files();
    return test_summary("test_weights");
}
