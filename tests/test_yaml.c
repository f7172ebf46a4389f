/* tests/test_yaml.c — the YAML subset (tools/yaml.c) against OmegaConf's trees, and the
 * ED-LoRA training options (tools/train_config.c) against the official files.
 *
 * Golden trees: tests/data/yaml/official.json and quirks.json, written by
 * tools/ref/gen_yaml_golden.py with OmegaConf.to_container(OmegaConf.load(f)) — the call
 * train_edlora.py makes. Compared exactly: types, key order, strings byte for byte, numbers
 * as doubles bit for bit. Official files come from ../shared/mixofshow-data/options when it
 * is there, else from the copies in tests/data/yaml/options (the others are skipped). */
#include "tests/test.h"
#include "tools/tools.h"

#include <math.h>
#include <time.h>

static const char *DATA = "tests/data/yaml";

static const char *tmp_path(const char *suffix) {     /* as tests/test_edlora.c */
    static char buf[512];
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = getenv("TEMP");
    if (!dir || !*dir) dir = "/tmp";
    snprintf(buf, sizeof buf, "%s/mixshow_test_yaml_%lu_%lu%s", dir, (unsigned long)time(NULL), (unsigned long)(clock() & 0xffffff), suffix);
    return buf;
}

/* ---- tree comparison ------------------------------------------------------------------------ */
static int same_number(double a, double b) { return (a == b && signbit(a) == signbit(b)) || (a != a && b != b); }

/* want: the golden JSON ({"__float__": "inf"} for non-finite floats); got: our YAML tree */
static int same_tree(const JsonValue *want, const JsonValue *got, char *where, size_t wn) {
    const JsonValue *f = want->type == JSON_OBJECT && want->count == 1 ? json_get(want, "__float__") : NULL;
    if (f && f->type == JSON_STRING) {
        double x = !strcmp(f->str, "nan") ? NAN : !strcmp(f->str, "inf") ? INFINITY : -INFINITY;
        if (got->type == JSON_NUMBER && same_number(x, got->number)) return 1;
        snprintf(where, wn, "line %d: expected %s", got->line, f->str);
        return 0;
    }
    if (want->type != got->type) {
        snprintf(where, wn, "line %d: expected %s, got %s", got->line, json_type_name(want->type), json_type_name(got->type));
        return 0;
    }
    switch (want->type) {
    case JSON_NULL: return 1;
    case JSON_BOOL: if (want->boolean == got->boolean) return 1; break;
    case JSON_NUMBER: if (same_number(want->number, got->number)) return 1;
        snprintf(where, wn, "line %d: expected %.17g, got %.17g", got->line, want->number, got->number); return 0;
    case JSON_STRING: if (want->len == got->len && !memcmp(want->str, got->str, want->len)) return 1;
        snprintf(where, wn, "line %d: expected '%s', got '%s'", got->line, want->str, got->str); return 0;
    case JSON_ARRAY: case JSON_OBJECT:
        if (want->count != got->count) { snprintf(where, wn, "line %d: %zu items, expected %zu", got->line, got->count, want->count); return 0; }
        for (size_t i = 0; i < want->count; i++) {
            const JsonValue *a = &want->items[i], *b = &got->items[i];
            if (want->type == JSON_OBJECT && (a->key_len != b->key_len || memcmp(a->key, b->key, a->key_len))) {
                snprintf(where, wn, "line %d: key #%zu is '%s', expected '%s'", b->line, i, b->key, a->key);
                return 0;
            }
            if (!same_tree(a, b, where, wn)) return 0;
        }
        return 1;
    }
    snprintf(where, wn, "line %d: values differ", got->line);
    return 0;
}

/* path of an official file, relative to options/: ../shared first, then the repository copy */
static int find_official(const char *rel, char *path, size_t n) {
    FILE *f;
    snprintf(path, n, "%s/mixofshow-data/options/%s", test_shared_dir(), rel);
    if ((f = fopen(path, "rb")) != NULL) { fclose(f); return 1; }
    snprintf(path, n, "%s/options/%s", DATA, rel);
    if ((f = fopen(path, "rb")) != NULL) { fclose(f); return 1; }
    return 0;
}

static void test_golden(const char *golden, int official) {
    char gpath[512];
    JsonValue *g = NULL;
    snprintf(gpath, sizeof gpath, "%s/%s", DATA, golden);
    if (!check(json_parse_file(gpath, &g) == MS_OK, "read %s: %s", gpath, ms_last_error())) return;
    const JsonValue *files = json_get(g, "files");
    int compared = 0, skipped = 0;
    for (size_t i = 0; i < json_len(files); i++) {
        const JsonValue *want = &files->items[i];
        char path[1024], where[400] = "";
        JsonValue *got = NULL;
        if (official) {
            if (!find_official(want->key, path, sizeof path)) { skipped++; continue; }
        } else {
            snprintf(path, sizeof path, "%s/%s", DATA, want->key);
        }
        MsStatus s = yaml_parse_file(path, &got);
        check(s == MS_OK && same_tree(want, got, where, sizeof where), "%-60s same tree as OmegaConf %s%s", want->key,
              s == MS_OK ? where : "", s == MS_OK ? "" : ms_last_error());
        compared++;
        json_free(got);
    }
    check(compared >= (official ? 3 : 1), "%s: %d files compared", golden, compared);
    if (skipped) printf("  (%d official files skipped: %s/mixofshow-data not found)\n", skipped, test_shared_dir());
    json_free(g);
}

/* ---- bad YAML --------------------------------------------------------------------------------- */
static void expect_yaml_error(const char *text, MsStatus code, const char *needle) {
    JsonValue *v = NULL;
    MsStatus s = yaml_parse(text, strlen(text), "t.yml", &v);
    char shown[48];
    size_t k = 0;
    for (const char *p = text; *p && k + 3 < sizeof shown; p++) { if (*p == '\n') { shown[k++] = '\\'; shown[k++] = 'n'; } else if (*p == '\t') { shown[k++] = '\\'; shown[k++] = 't'; } else shown[k++] = (unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f ? *p : '?'; }
    shown[k] = '\0';
    check(s == code && strstr(ms_last_error(), needle) != NULL, "%-30s -> %s: %s", shown, ms_status_name(s), s == MS_OK ? "(parsed)" : ms_last_error());
    json_free(v);
}

static void test_bad_yaml(void) {
    expect_yaml_error("a:\n\tb: 1\n", MS_ERR_FORMAT, "t.yml:2:1: tab character");
    expect_yaml_error("a: 1\n  b: 2\n", MS_ERR_FORMAT, "t.yml:2:3: bad indentation");
    expect_yaml_error("a:\n    b: 1\n  c: 2\n", MS_ERR_FORMAT, "t.yml:3:3: bad indentation");
    expect_yaml_error("a: 'x\n", MS_ERR_UNSUPPORTED, "t.yml:1:4: unterminated quoted scalar");
    expect_yaml_error("a: \"x", MS_ERR_FORMAT, "t.yml:1:4: unterminated quoted scalar");
    expect_yaml_error("a: 1\nb: 2\na: 3\n", MS_ERR_FORMAT, "t.yml:3:1: duplicate key 'a' (first at line 1)");
    expect_yaml_error("x: {a: 1, a: 2}\n", MS_ERR_FORMAT, "duplicate key 'a'");
    expect_yaml_error("a: &x 1\n", MS_ERR_UNSUPPORTED, "unsupported YAML feature: anchors");
    expect_yaml_error("a: *x\n", MS_ERR_UNSUPPORTED, "unsupported YAML feature: anchors and aliases");
    expect_yaml_error("a: |\n  text\n", MS_ERR_UNSUPPORTED, "unsupported YAML feature: block scalars");
    expect_yaml_error("a: 1\n---\nb: 2\n", MS_ERR_UNSUPPORTED, "unsupported YAML feature: document markers");
    expect_yaml_error("? a\n: 1\n", MS_ERR_UNSUPPORTED, "unsupported YAML feature: explicit keys");
    expect_yaml_error("[a]: 1\n", MS_ERR_UNSUPPORTED, "complex key");
    expect_yaml_error("a: !!map {}\n", MS_ERR_UNSUPPORTED, "unsupported YAML feature: tag '!!map'");
    expect_yaml_error("<<: {a: 1}\n", MS_ERR_UNSUPPORTED, "merge key");
    expect_yaml_error("1: a\n", MS_ERR_UNSUPPORTED, "key that is not a string");
    expect_yaml_error("a: b: c\n", MS_ERR_FORMAT, "t.yml:1:4: a mapping cannot start on the line of another key");
    expect_yaml_error("a: - b\n", MS_ERR_FORMAT, "block sequence cannot start");
    expect_yaml_error("a: this is\n  continued\n", MS_ERR_FORMAT, "multi-line plain scalar");
    expect_yaml_error("a: [1, 2\n", MS_ERR_FORMAT, "expected ']' to close");
    expect_yaml_error("a: [1,, 2]\n", MS_ERR_FORMAT, "expected a value before ','");
    expect_yaml_error("a: [x?y]\n", MS_ERR_FORMAT, "expected ',' or ']'");
    expect_yaml_error("a: [b: 1]\n", MS_ERR_UNSUPPORTED, "single-pair mapping");
    expect_yaml_error("a: [1] x\n", MS_ERR_FORMAT, "expected the end of the line after the flow collection");
    expect_yaml_error("- a\nb: 1\n", MS_ERR_FORMAT, "expected '- '");
    expect_yaml_error("a: 1\n- b\n", MS_ERR_FORMAT, "expected a mapping key");
    expect_yaml_error("12.5\n", MS_ERR_FORMAT, "expected a mapping or a sequence at the top level (OmegaConf), found a number");
    expect_yaml_error("x: {a\n: 1}\n", MS_ERR_FORMAT, "t.yml:2:1: expected ',' or '}' (a ':' must be on the line of its key)");
    expect_yaml_error(" a\nb\n", MS_ERR_UNSUPPORTED, "t.yml:2:1: unsupported YAML feature: a multi-line plain scalar");
    expect_yaml_error("a: ${b}\n", MS_ERR_UNSUPPORTED, "OmegaConf interpolation");
    expect_yaml_error("a: !!float abc\n", MS_ERR_FORMAT, "t.yml:1:12: 'abc' is not a float");
    expect_yaml_error("a: !!int 1.5\n", MS_ERR_FORMAT, "is not an integer");
    expect_yaml_error("a: \"\\q\"\n", MS_ERR_FORMAT, "unknown escape");
    expect_yaml_error("a: \"\\ud800\"\n", MS_ERR_FORMAT, "UTF-8 cannot hold");
    expect_yaml_error("a: \x01\n", MS_ERR_FORMAT, "non-printable character U+0001");
    expect_yaml_error("a: \xc3\x28\n", MS_ERR_FORMAT, "invalid UTF-8");
    expect_yaml_error("a: 1\rb: 2\n", MS_ERR_UNSUPPORTED, "CR line break");
    expect_yaml_error("%YAML 1.1\n---\na: 1\n", MS_ERR_UNSUPPORTED, "directives");
    expect_yaml_error("a: @x\n", MS_ERR_FORMAT, "expected a value");
    {   /* nesting limit: [[[[...]]]] and a staircase of block mappings */
        size_t n = JSON_MAX_DEPTH + 10;
        char *t = (char *)malloc(2 * n + 8), *b = (char *)malloc(n * (n + 8));
        size_t k = 0;
        strcpy(t, "a: ");
        for (size_t i = 0; i < n; i++) t[3 + i] = '[';
        t[3 + n] = '\0';
        expect_yaml_error(t, MS_ERR_FORMAT, "nesting deeper than 256 levels");
        for (size_t i = 0; i < n; i++) { memset(b + k, ' ', i); k += i; memcpy(b + k, "k:\n", 3); k += 3; }
        b[k] = '\0';
        expect_yaml_error(b, MS_ERR_FORMAT, "nesting deeper than 256 levels");
        free(t); free(b);
    }
    {   /* good small cases not in quirks.yml: empty document, CRLF, BOM, scalar values */
        JsonValue *v = NULL;
        check(yaml_parse("", 0, "e", &v) == MS_OK && v->type == JSON_OBJECT && v->count == 0, "empty document is {} (OmegaConf)");
        json_free(v); v = NULL;
        check(yaml_parse("~\n", 2, "e", &v) == MS_OK && v->type == JSON_OBJECT && v->count == 0, "null document is {} (OmegaConf)");
        json_free(v); v = NULL;
        check(yaml_parse("just a string # c\n", 18, "e", &v) == MS_OK && json_len(v) == 1 && !strcmp(v->items[0].key, "just a string") &&
              v->items[0].type == JSON_NULL, "a top-level string s is {s: null} (OmegaConf.load)");
        json_free(v); v = NULL;
        check(yaml_parse("\xEF\xBB\xBFk: v\r\nl: [1]\r\n", strlen("\xEF\xBB\xBFk: v\r\nl: [1]\r\n"), "crlf", &v) == MS_OK && json_len(v) == 2 &&
              !strcmp(json_get_string(v, "k", ""), "v") && json_len(json_get(v, "l")) == 1, "BOM + CRLF");
        json_free(v); v = NULL;
        check(yaml_parse_value("!!float 1e-3", 12, "v", &v) == MS_OK && v->type == JSON_NUMBER && v->number == 1e-3, "value !!float 1e-3");
        json_free(v); v = NULL;
        check(yaml_parse_value("", 0, "v", &v) == MS_OK && v->type == JSON_NULL, "empty value is null");
        json_free(v);
    }
}

/* ---- never crash: mutated official files ----------------------------------------------------- */
static void test_mutations(void) {
    char path[1024];
    if (!find_official("train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml", path, sizeof path)) return;
    FILE *f = fopen(path, "rb");
    static char text[8192], buf[8192];
    size_t n = f ? fread(text, 1, sizeof text, f) : 0;
    if (f) fclose(f);
    uint64_t st = 88172645463325252ull;
    int parsed = 0, rejected = 0, cfg_ok = 0;
    static const char alphabet[] = " \t\n\r:-#[]{},'\"!&*|>?%@`~0aZ.";
    for (int it = 0; it < 4000; it++) {
        memcpy(buf, text, n);
        size_t m = n;
        for (int k = 0; k < 1 + it % 4; k++) {
            st ^= st << 13; st ^= st >> 7; st ^= st << 17;
            size_t pos = (size_t)(st >> 16) % m;
            int op = (int)(st & 3);
            if (op == 0) buf[pos] = alphabet[(st >> 40) % (sizeof alphabet - 1)];
            else if (op == 1) m = pos + 1;                                  /* truncate */
            else if (op == 2 && m > 1) { memmove(buf + pos, buf + pos + 1, m - pos - 1); m--; }
            else buf[pos] = (char)(st >> 32);
        }
        JsonValue *v = NULL;
        if (yaml_parse(buf, m, "mut", &v) == MS_OK) {
            TrainDataConfig d; MsTrainConfig c;
            parsed++;
            cfg_ok += train_config_from_yaml(v, &d, &c) == MS_OK;
        } else rejected++;
        json_free(v);
    }
    check(parsed > 0 && rejected > 0, "4000 mutated files: %d parsed (%d valid configs), %d rejected, none crashed", parsed, cfg_ok, rejected);
}

/* ---- training config --------------------------------------------------------------------------- */
static int load_cfg(const char *rel, const char *const *sets, int n, TrainDataConfig *d, MsTrainConfig *m, MsStatus *s) {
    char path[1024];
    if (!find_official(rel, path, sizeof path)) return 0;
    *s = train_config_load(path, sets, n, d, m);
    return 1;
}

static void test_official_configs(void) {
    static const char *const train_files[] = {
        "train/EDLoRA/anime/1001_1_EDLoRA_hina_Anyv4_B4_Repeat500_v6_final_nomask.yml",
        "train/EDLoRA/anime/1002_1_EDLoRA_kaori_Anyv4_B4_Repeat500_v6_final_nomask.yml",
        "train/EDLoRA/anime/1003_1_EDLoRA_tezuka_Anyv4_B4_Repeat500_v6_final_nomask.yml",
        "train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml",
        "train/EDLoRA/real/8102_EDLoRA_hermione_Cmix_B4_Repeat500.yml",
        "train/EDLoRA/real/8103_EDLoRA_thanos_Cmix_B4_Repeat250.yml",
    };
    TrainDataConfig d;
    MsTrainConfig m;
    MsStatus s = MS_OK;
    int loaded = 0;
    for (size_t i = 0; i < sizeof train_files / sizeof *train_files; i++) {
        if (!load_cfg(train_files[i], NULL, 0, &d, &m, &s)) continue;
        check(s == MS_OK, "train config %s: %s", train_files[i], s == MS_OK ? "loads" : ms_last_error());
        loaded++;
    }
    check(loaded >= 2, "%d official train configs loaded", loaded);

    /* 8101 potter: every field */
    if (load_cfg("train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml", NULL, 0, &d, &m, &s) && check(s == MS_OK, "8101 loads")) {
        check(!strcmp(d.name, "8101_EDLoRA_potter_Cmix_B4_Repeat500") && m.seed == 0 && !strcmp(d.mixed_precision, "fp16"), "8101 name/seed/precision");
        check(!strcmp(d.concept_list, "datasets/data_cfgs/MixofShow/single-concept/characters/real/potter.json") && d.use_caption == 1 &&
              d.use_mask == 1 && d.batch_size == 2 && d.enlarge_ratio == 500, "8101 datasets.train scalars");
        check(d.n_transforms == 5 && d.transforms[0].type == MS_TF_HUMAN_RESIZE_CROP_V3 && d.transforms[0].size == 512 &&
              d.transforms[0].crop_p == 0.5 && d.transforms[1].type == MS_TF_TO_TENSOR && d.transforms[2].type == MS_TF_NORMALIZE &&
              d.transforms[2].n_mean == 1 && d.transforms[2].mean[0] == 0.5 && d.transforms[2].std[0] == 0.5 &&
              d.transforms[3].type == MS_TF_SHUFFLE_CAPTION && d.transforms[3].keep_token_num == 1 &&
              d.transforms[4].type == MS_TF_ENHANCE_TEXT && !strcmp(d.transforms[4].enhance_type, "human"), "8101 instance_transform");
        check(d.n_replace == 1 && !strcmp(d.replace_from[0], "<TOK>") && !strcmp(d.replace_to[0], "<potter1> <potter2>") &&
              d.n_val_replace == 1 && !strcmp(d.val_replace_to[0], "<potter1> <potter2>"), "8101 replace_mapping");
        check(!strcmp(d.val_prompts, "datasets/validation_prompts/single-concept/characters/test_man.txt") && d.val_samples_per_prompt == 8 &&
              d.val_latent_size[0] == 4 && d.val_latent_size[1] == 64 && d.val_latent_size[2] == 64 && d.val_batch_size == 4, "8101 val_vis");
        check(!strcmp(d.pretrained_path, "experiments/pretrained_models/chilloutmix") && m.enable_edlora == 1, "8101 models.pretrained_path");
        check(m.tune_emb && m.tune_te && m.tune_unet && m.lr_emb == 1e-3 && m.lr_te == 1e-5 && m.lr_unet == 1e-4 && isnan(m.wd_emb) &&
              m.te_rank == 4 && m.unet_rank == 4 && m.te_alpha == 1.0 && m.unet_alpha == 1.0, "8101 finetune_cfg");
        check(m.n_words == 2 && !strcmp(m.words[0], "<potter1>") && !strcmp(m.words[1], "<potter2>") && !strcmp(m.init[0], "<rand-0.013>") &&
              !strcmp(m.init[1], "man"), "8101 concept words and initializers");
        check(m.has_noise_offset && m.noise_offset == 0.01 && m.has_attn_reg && m.attn_reg_weight == 0.01 && m.reg_full_identity == 0 &&
              m.use_mask_loss == 1, "8101 loss options");
        check(m.weight_decay == 0.01 && m.beta1 == 0.9 && m.beta2 == 0.999 && m.adam_eps == 1e-8 && m.emb_norm_threshold == 0.55 &&
              m.total_iter == 0, "8101 train (AdamW, emb_norm_threshold; total_iter left 0)");
        check(d.val_during_save && d.compose_visualize && d.n_alpha == 3 && d.alpha_list[0] == 0 && d.alpha_list[1] == 0.7 &&
              d.alpha_list[2] == 1.0 && d.val_steps == 50 && d.val_guidance == 7.5 && d.print_freq == 10 && d.save_checkpoint_freq == 10000,
              "8101 val + logger");
    }
    /* 1001 hina (anime, no mask loss, no unet_kv_drop_rate key) */
    if (load_cfg("train/EDLoRA/anime/1001_1_EDLoRA_hina_Anyv4_B4_Repeat500_v6_final_nomask.yml", NULL, 0, &d, &m, &s) && check(s == MS_OK, "1001 loads")) {
        check(!strcmp(d.name, "1001_1_EDLoRA_hina_Anyv4_B4_Repeat500_v6_final_nomask") &&
              !strcmp(d.pretrained_path, "experiments/pretrained_models/anything-v4.0") &&
              !strcmp(d.concept_list, "datasets/data_cfgs/MixofShow/single-concept/characters/anime/hina_amano.json"), "1001 name/paths");
        check(m.use_mask_loss == 0 && d.use_mask == 1 && m.n_words == 2 && !strcmp(m.words[0], "<hina1>") && !strcmp(m.words[1], "<hina2>") &&
              !strcmp(m.init[0], "<rand-0.013>") && !strcmp(m.init[1], "girl") && !strcmp(d.replace_to[0], "<hina1> <hina2>") &&
              d.enlarge_ratio == 500, "1001 concept, use_mask_loss false");
        check(!strcmp(d.val_prompts, "datasets/validation_prompts/single-concept/characters/test_girl.txt"), "1001 val prompts");
    }
    /* an inference (test) option file is not a training config */
    if (load_cfg("test/EDLoRA/anime/1001_EDLoRA_hina_Anyv4_B4_Iter1K.yml", NULL, 0, &d, &m, &s))
        check(s == MS_ERR_ARG && strstr(ms_last_error(), "datasets.train: missing"), "test-time file rejected: %s", ms_last_error());
}

/* --set: overrides, and every way it can go wrong */
static void expect_set(const char *const *sets, int n, MsStatus code, const char *needle) {
    TrainDataConfig d; MsTrainConfig m; MsStatus s = MS_OK;
    if (!load_cfg("train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml", sets, n, &d, &m, &s)) return;
    check(s == code && strstr(ms_last_error(), needle), "--set %-40s -> %s: %s", sets[n - 1], ms_status_name(s), s == MS_OK ? "ok" : ms_last_error());
}

static void test_sets(void) {
    TrainDataConfig d; MsTrainConfig m; MsStatus s = MS_OK;
    const char *ok_sets[] = { "models.noise_offset=0.02", "train.optim_g.betas=[0.8, 0.99]", "models.attn_reg_weight=~",
                              "datasets.train.batch_size_per_gpu=1", "models.initializer_token=", "train.optim_g.eps=!!float 1e-6",
                              "val.alpha_list=[1]", "name=my run", "models.finetune_cfg.text_embedding.weight_decay=0",
                              "models.finetune_cfg.unet.lora_cfg.rank=8", "train.emb_norm_threshold=1e-1" };
    if (load_cfg("train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml", ok_sets, (int)(sizeof ok_sets / sizeof *ok_sets), &d, &m, &s)) {
        check(s == MS_OK, "--set overrides load: %s", s == MS_OK ? "" : ms_last_error());
        check(s == MS_OK && m.noise_offset == 0.02 && m.beta1 == 0.8 && m.beta2 == 0.99 && !m.has_attn_reg && d.batch_size == 1 &&
              !strcmp(m.init[0], "<rand-0.017>") && !strcmp(m.init[1], "<rand-0.017>") && m.adam_eps == 1e-6 && d.n_alpha == 1 &&
              d.alpha_list[0] == 1 && !strcmp(d.name, "my run") && m.wd_emb == 0 && m.unet_rank == 8 && m.te_rank == 4 &&
              m.emb_norm_threshold == 0.1, "--set values arrive (scalars, lists, null, empty, tags, new known key)");
    }
    const char *one[2] = { "models.noise_offset=0.02", NULL };
    one[1] = "train.optim_g.foo=1"; expect_set(one, 2, MS_ERR_ARG, "--set train.optim_g.foo: unknown option");
    one[1] = "trian.optim_g.lr=1"; expect_set(one, 2, MS_ERR_ARG, "--set trian: unknown option");
    one[1] = "models.noise_offset=abc"; expect_set(one, 2, MS_ERR_ARG, "models.noise_offset: expected a number or null, found a string 'abc'");
    one[1] = "models.noise_offset.x=1"; expect_set(one, 2, MS_ERR_ARG, "'models.noise_offset' is a number, not a mapping");
    one[1] = "train.optim_g.betas=[0.9"; expect_set(one, 2, MS_ERR_FORMAT, "--set train.optim_g.betas:1:5: expected ']'");
    one[1] = "=1"; expect_set(one, 2, MS_ERR_ARG, "expected KEY.PATH=VALUE");
    one[1] = "models.enable_edlora=1"; expect_set(one, 2, MS_ERR_ARG, "models.enable_edlora: expected a boolean (true/false), found a number 1");
    one[1] = "train.optim_g.betas=[0.9]"; expect_set(one, 2, MS_ERR_ARG, "train.optim_g.betas: expected a list of 2 numbers, found a list of 1 items");
    one[1] = "models.initializer_token=man"; expect_set(one, 2, MS_ERR_ARG, "1 initializer words for 2 concept words");
    one[1] = "models.initializer_token=<rand-x>+man"; expect_set(one, 2, MS_ERR_ARG, "expected <rand-SIGMA>");
    one[1] = "gradient_accumulation_steps=2"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "gradient accumulation is not supported");
    one[1] = "train.optim_g.type=Adam"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "optimizer 'Adam' is not supported");
    one[1] = "train.scheduler=cosine"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "train.scheduler: 'cosine' is not supported");
    one[1] = "train.unet_kv_drop_rate=0.5"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "K/V dropout is not supported");
    one[1] = "models.finetune_cfg.unet.lora_cfg.where=Transformer2DModel"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "lora_cfg.where: 'Transformer2DModel' is not supported");
    one[1] = "models.finetune_cfg.text_encoder.lora_cfg.where=Linear"; expect_set(one, 2, MS_ERR_ARG, "expected CLIPAttention (or CLIPEncoderLayer)");
    one[1] = "path.pretrain_network=net.pth"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "path.pretrain_network");
    one[1] = "datasets.train.name=FooDataset"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "only LoraDataset");
    one[1] = "datasets.train.instance_transform=[{type: CenterCrop, size: 512}]"; expect_set(one, 2, MS_ERR_UNSUPPORTED, "unsupported transform 'CenterCrop'");
    one[1] = "datasets.train.instance_transform=[{type: ToTensor, x: 1}]"; expect_set(one, 2, MS_ERR_ARG, "instance_transform[0].x: unknown option");
    one[1] = "manual_seed=-1"; expect_set(one, 2, MS_ERR_ARG, "manual_seed: -1 is out of range");
    one[1] = "models.new_concept_token=<a>++<b>"; expect_set(one, 2, MS_ERR_ARG, "word 2 of '<a>++<b>' is empty");
}

/* wrong types / unknown keys with file positions (a file on disk) */
static void test_bad_config_files(void) {
    static const struct { const char *text, *needle; MsStatus code; } cases[] = {
        { "name: x\nbogus: 1\n", ".yml:2:1: bogus: unknown option", MS_ERR_ARG },
        { "name: [x]\n", ".yml:1:1: name: expected a string, found a list of 1 items", MS_ERR_ARG },
        { "name: x\ndatasets:\n  train:\n    concept_list: c.json\n    use_mask: maybe\n", ".yml:5:5: datasets.train.use_mask: expected a boolean", MS_ERR_ARG },
        { "name: x\ndatasets:\n  train:\n    concept_list: c.json\n", "datasets.train.instance_transform: missing", MS_ERR_ARG },
        { "name: x\n", "datasets: missing", MS_ERR_ARG },
    };
    const char *path = tmp_path(".yml");
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        FILE *f = fopen(path, "wb");
        if (!f) { check(0, "cannot write %s", path); return; }
        fputs(cases[i].text, f);
        fclose(f);
        TrainDataConfig d; MsTrainConfig m;
        MsStatus s = train_config_load(path, NULL, 0, &d, &m);
        const char *e = ms_last_error();
        check(s == cases[i].code && strstr(e, cases[i].needle), "config case %zu -> %s: %s", i, ms_status_name(s), e);
    }
    remove(path);
    TrainDataConfig d; MsTrainConfig m;
    check(train_config_load("tests/data/yaml/no-such-file.yml", NULL, 0, &d, &m) == MS_ERR_IO, "missing file: %s", ms_last_error());
}

int main(void) {
    test_golden("official.json", 1);
    test_golden("quirks.json", 0);
    test_bad_yaml();
    test_official_configs();
    test_sets();
    test_bad_config_files();
    test_mutations();
    return test_summary("test_yaml");
}
