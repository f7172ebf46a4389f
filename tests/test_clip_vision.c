/* tests/test_clip_vision.c — the CLIP image tower, the projections and CLIPImageProcessor
 * (models/clip.c "CLIPModel", tools/clip_model.c) against transformers' own CLIPModel and
 * CLIPImageProcessor on random weights (tools/ref/gen_clip_vision_golden.py), two shapes:
 *   a: vision 64 wide, 4 heads, 3 layers, patch 8 on 32x32, quick_gelu; text 32 wide; safetensors
 *   b: vision 48 wide, 3 heads, 2 layers, patch 6 on 30x30, gelu, resize 34 + crop 30;
 *      text 40 wide, 5 heads; pytorch_model.bin, preprocessor sizes as plain ints
 *   c: a small pair on the real CLIP vocabulary (prompts through the tokenizer), eos_token_id 49407
 *      (the pooling rule of configs written after transformers PR #24773), F16 weights
 * Checks: pixel_values of 5 PNGs (RGB, grey, RGBA; shrunk and enlarged with PIL bicubic) bit for
 * bit; every vision hidden state (runs with the first k layers), last_hidden_state, pooler_output,
 * image_embeds, text last_hidden_state, pooled output and text_embeds to rel-L2 <= 1e-5; files and
 * prompts to embeddings end to end; the pooling rule of eos_token_id != 2; 1 vs 2 threads bitwise; bad
 * configs and checkpoints fail with messages naming the key. */
#include "tests/test.h"
#include "tools/tools.h"

#define TOL 1e-5

static float *golden(const StFile *g, const char *name, size_t *n) {
    float *x = NULL;
    size_t k = 0;
    if (st_load_f32(g, name, &x, &k)) { check(0, "golden %s: %s", name, ms_last_error()); return NULL; }
    if (n) *n = k;
    return test_track(x);
}

/* The image tower with the first `layers` layers on B images: a copy of last_hidden_state (and,
 * when pooled / embeds are not NULL, of those). */
static float *vision_run(const MsClip *m, int layers, const float *px, int B, float *pooled, float *embeds) {
    ClipModelConfig c = m->config;
    ClipVisionParams vp;
    ClipVisionActs a;
    Arena ar;
    float *out = NULL;
    c.vision.num_hidden_layers = layers;
    if (clip_vision_params(&vp, &m->table, &c) || arena_init(&ar, clip_vision_sizes(&c, B))) {
        check(0, "vision setup: %s", ms_last_error());
        return NULL;
    }
    if (clip_vision_acts_alloc(&a, &ar, &c, B) || clip_vision_forward(&a, &vp, px, &c)) {
        check(0, "vision forward: %s", ms_last_error());
    } else {
        const size_t n = (size_t)B * a.T * c.vision.hidden_size;
        out = test_track(test_zeros(n));
        memcpy(out, a.enc.xf, n * sizeof(float));
        if (pooled) memcpy(pooled, a.pooled, (size_t)B * c.vision.hidden_size * sizeof(float));
        if (embeds) memcpy(embeds, a.embeds, (size_t)B * c.projection_dim * sizeof(float));
    }
    arena_free(&ar);
    return out;
}

static void test_case(const char *name) {
    char dir[256], path[512], what[128];
    StFile g;
    MsClip m;
    snprintf(dir, sizeof dir, "tests/data/clip_vision/%s", name);
    snprintf(path, sizeof path, "%s/golden.safetensors", dir);
    if (st_open(&g, path)) { check(0, "%s: %s", path, ms_last_error()); return; }
    if (ms_clip_load(dir, &m)) { check(0, "load %s: %s", dir, ms_last_error()); st_close(&g); return; }
    const ClipModelConfig *c = &m.config;
    const int S = c->vision.image_size, E = c->projection_dim, Dv = c->vision.hidden_size, Dt = c->text.hidden_size;
    const int B = 5, L = c->vision.num_hidden_layers;
    printf("case %s: vision %d wide, %d heads, %d layers, patch %d on %d, %s; text %d wide; projection %d\n", name, Dv,
           c->vision.num_attention_heads, L, c->vision.patch_size, S, ms_activation_name(c->vision.hidden_act), Dt, E);

    /* CLIPImageProcessor: every pixel value bit for bit */
    size_t npx;
    float *want_px = golden(&g, "pixel_values", &npx), *px = test_track(test_zeros((size_t)B * 3 * S * S));
    int ok = want_px && npx == (size_t)B * 3 * S * S;
    for (int i = 0; i < B && ok; i++) {
        MsImage img;
        snprintf(path, sizeof path, "%s/img%d.png", dir, i);
        if (ms_image_read(path, 3, &img) || ms_clip_preprocess(px + (size_t)i * 3 * S * S, S, &img, &m.proc)) {
            check(0, "%s: %s", path, ms_last_error());
            ok = 0;
        } else {
            snprintf(what, sizeof what, "%s img%d %dx%d (%d ch) pixel_values", name, i, img.w, img.h, img.file_channels);
            check_bitwise(what, px + (size_t)i * 3 * S * S, want_px + (size_t)i * 3 * S * S, (size_t)3 * S * S);
            ms_image_free(&img);
        }
    }
    if (!ok) { ms_clip_free(&m); st_close(&g); return; }

    /* image tower: hidden_states[k] = output of the first k layers; then the full model */
    for (int k = 0; k <= L; k++) {
        char key[64];
        snprintf(key, sizeof key, "vision.hidden_states.%d", k);
        float *want = golden(&g, key, NULL), *got = vision_run(&m, k, want_px, B, NULL, NULL);
        snprintf(what, sizeof what, "%s %s", name, key);
        if (want && got) check_close(what, got, want, (size_t)B * (S / c->vision.patch_size) * (S / c->vision.patch_size) * Dv + (size_t)B * Dv, TOL, 0);
    }
    float *pooled = test_track(test_zeros((size_t)B * Dv)), *emb = test_track(test_zeros((size_t)B * E));
    size_t nlast;
    float *want_last = golden(&g, "vision.last_hidden_state", &nlast);
    float *last = vision_run(&m, L, want_px, B, pooled, emb);
    float *want_pool = golden(&g, "vision.pooler_output", NULL), *want_emb = golden(&g, "image_embeds", NULL);
    if (last && want_last && want_pool && want_emb) {
        snprintf(what, sizeof what, "%s vision last_hidden_state", name);
        check_close(what, last, want_last, nlast, TOL, 0);
        snprintf(what, sizeof what, "%s vision pooler_output", name);
        check_close(what, pooled, want_pool, (size_t)B * Dv, TOL, 0);
        snprintf(what, sizeof what, "%s image_embeds", name);
        check_close(what, emb, want_emb, (size_t)B * E, TOL, 0);
        /* end to end: files -> embeddings (the API mixshow eval uses) */
        float *one = test_track(test_zeros((size_t)B * E));
        int fok = 1;
        for (int i = 0; i < B && fok; i++) {
            snprintf(path, sizeof path, "%s/img%d.png", dir, i);
            if (ms_clip_embed_image_file(&m, path, one + (size_t)i * E)) { check(0, "%s: %s", path, ms_last_error()); fok = 0; }
        }
        snprintf(what, sizeof what, "%s image files -> image_embeds", name);
        if (fok) check_close(what, one, want_emb, (size_t)B * E, TOL, 0);
        double cw = ms_cosine(want_emb, want_emb + E, E), cg = ms_cosine(one, one + E, E);
        check(fabs(cw - cg) < 1e-6, "%s cosine(img0, img1) %.7f vs transformers' embeddings %.7f", name, cg, cw);
        /* one image at a time == the batch (no cross-talk), 1 vs 2 threads bitwise */
        float *e2 = test_track(test_zeros((size_t)B * E));
        ms_set_threads(1);
        float *l1 = vision_run(&m, L, want_px, B, NULL, e2);
        ms_set_threads(2);
        float *l2 = vision_run(&m, L, want_px, B, NULL, NULL);
        ms_set_threads(0);
        snprintf(what, sizeof what, "%s vision 1 vs 2 threads", name);
        if (l1 && l2) check_bitwise(what, l1, l2, nlast);
    }

    /* text tower: last_hidden_state, pooled row, projection */
    const StTensor *tid = st_find(&g, "text.input_ids");
    if (!tid || tid->ndim != 2) { check(0, "golden text.input_ids"); ms_clip_free(&m); st_close(&g); return; }
    const int TB = (int)tid->shape[0], T = (int)tid->shape[1];
    int32_t *ids = (int32_t *)malloc((size_t)TB * T * sizeof *ids);
    float *fid = golden(&g, "text.input_ids", NULL);
    for (int i = 0; i < TB * T; i++) ids[i] = (int32_t)fid[i];
    Arena ar;
    ClipTextActs ta;
    float *tp = test_track(test_zeros((size_t)TB * Dt)), *te = test_track(test_zeros((size_t)TB * E));
    if (arena_init(&ar, clip_text_sizes(&c->text, TB, T, 0, CLIP_INFER)) ||
        clip_text_acts_alloc(&ta, &ar, &c->text, TB, T, 0, CLIP_INFER) ||
        clip_text_forward(&ta, &m.text, NULL, ids, NULL, 0, &c->text) || clip_text_project(tp, te, &ta, m.text_proj, ids, c)) {
        check(0, "text: %s", ms_last_error());
    } else {
        float *w1 = golden(&g, "text.last_hidden_state", NULL), *w2 = golden(&g, "text.pooler_output", NULL);
        float *w3 = golden(&g, "text_embeds", NULL), *te2 = test_track(test_zeros((size_t)TB * E));
        snprintf(what, sizeof what, "%s text last_hidden_state", name);
        if (w1) check_close(what, ta.out, w1, (size_t)TB * T * Dt, TOL, 0);
        snprintf(what, sizeof what, "%s text pooler_output", name);
        if (w2) check_close(what, tp, w2, (size_t)TB * Dt, TOL, 0);
        snprintf(what, sizeof what, "%s text_embeds", name);
        if (w3) check_close(what, te, w3, (size_t)TB * E, TOL, 0);
        snprintf(what, sizeof what, "%s ms_clip_text_embeds", name);
        if (w3 && !ms_clip_text_embeds(&m, ids, TB, T, te2)) check_close(what, te2, w3, (size_t)TB * E, TOL, 0);
        /* eos_token_id != 2 (transformers >= PR #24773): the first position holding eos_token_id,
         * else 0; eos_token_id == 2: argmax(ids), the first of equal maxima */
        ClipModelConfig c2 = *c;
        int32_t *row = ids, keep3 = row[3];
        c2.text.eos_token_id = row[3];
        float *p2 = test_track(test_zeros((size_t)TB * Dt));
        int first = 0;
        while (row[first] != row[3]) first++;
        clip_text_project(p2, te2, &ta, m.text_proj, ids, &c2);
        check(!memcmp(p2, ta.out + (size_t)first * Dt, (size_t)Dt * sizeof(float)),
              "%s eos_token_id %d: pooled row = first position holding it (%d)", name, (int)keep3, first);
        c2.text.eos_token_id = -5;
        clip_text_project(p2, te2, &ta, m.text_proj, ids, &c2);
        check(!memcmp(p2, ta.out, (size_t)Dt * sizeof(float)), "%s eos_token_id absent from the ids: row 0", name);
    }
    arena_free(&ar);
    /* prompts (case c: the real vocabulary): CLIPTokenizer's ids, then the embeddings end to end */
    const char *pj = st_meta(&g, "prompts");
    JsonValue *pr = NULL;
    if (!strcmp(name, "c") && (!pj || json_parse(pj, strlen(pj), "prompts", &pr) || json_len(pr) != (size_t)TB ||
                               ms_clip_tokenizer_load("models/tiny-sd/tokenizer", &m.tok))) {
        check(0, "case c prompts / tokenizer: %s", ms_last_error());
    } else if (pr) {
        float *w3 = golden(&g, "text_embeds", NULL), *pe = test_track(test_zeros((size_t)TB * E));
        int32_t *tk = (int32_t *)malloc((size_t)T * sizeof *tk);
        int same = 1;
        m.has_tokenizer = 1;
        for (int b = 0; b < TB; b++) {
            const char *p = json_at(pr, (size_t)b)->str;
            same &= !clip_tokenize(&m.tok, p, strlen(p), tk, T) && !memcmp(tk, ids + (size_t)b * T, (size_t)T * sizeof *tk);
            if (ms_clip_embed_prompt(&m, p, pe + (size_t)b * E)) check(0, "prompt '%s': %s", p, ms_last_error());
        }
        check(same, "%s: the %d prompts tokenize to CLIPTokenizer's ids", name, TB);
        snprintf(what, sizeof what, "%s prompts -> text_embeds", name);
        if (w3) check_close(what, pe, w3, (size_t)TB * E, TOL, 0);
        free(tk);
    }
    json_free(pr);
    free(ids);
    ms_clip_free(&m);
    st_close(&g);
}

/* A config.json text through ms_clip_model_config_from_json, then (parse and checks passing) its
 * table filled from case a's weights: the status and a piece of the message. */
static void expect_error(const char *text, const char *weights, MsStatus want, const char *needle) {
    JsonValue *j = NULL;
    ClipModelConfig c;
    MsParamTable t;
    MsStatus s = json_parse(text, strlen(text), "config.json", &j);
    if (!s) s = ms_clip_model_config_from_json(j, &c);
    if (!s && !(s = ms_param_table_clip(&c, &t))) {
        s = ms_table_fill_file(&t, weights, 0, "CLIPModel", NULL);
        ms_param_table_free(&t);
    }
    json_free(j);
    const char *msg = ms_last_error();
    check(s == want && strstr(msg, needle) != NULL, "%.60s... -> status %d (want %d): %s", text, (int)s, (int)want, msg);
}

static void test_errors(void) {
    static const char *const A = "tests/data/clip_vision/a/model.safetensors";
    char cfg[1024], bad[256];
    snprintf(cfg, sizeof cfg, "{\"projection_dim\": %%d, \"text_config\": {\"vocab_size\": 300, \"hidden_size\": 32, "
             "\"intermediate_size\": 64, \"num_attention_heads\": 4, \"num_hidden_layers\": 2, \"max_position_embeddings\": 16}, "
             "\"vision_config\": {\"hidden_size\": 64, \"intermediate_size\": 128, \"num_attention_heads\": 4, "
             "\"num_hidden_layers\": %%d, \"patch_size\": 8, \"image_size\": 32}}");
    char text[1100];
    snprintf(text, sizeof text, cfg, 24, 3);
    expect_error(text, A, MS_OK, "");
    snprintf(text, sizeof text, cfg, 25, 3);
    expect_error(text, A, MS_ERR_SHAPE, "projection.weight' has shape [24, ");
    snprintf(text, sizeof text, cfg, 24, 4);
    expect_error(text, A, MS_ERR_FORMAT, "missing tensor 'vision_model.encoder.layers.3.");
    snprintf(text, sizeof text, cfg, 24, 2);
    expect_error(text, A, MS_ERR_FORMAT, "unexpected tensor 'vision_model.encoder.layers.2.");
    expect_error("{\"vision_config\": {\"hidden_size\": 64, \"num_attention_heads\": 5}}", A, MS_ERR_ARG,
                 "num_attention_heads 5");
    expect_error("{\"vision_config\": {\"hidden_act\": \"relu\"}}", A, MS_ERR_UNSUPPORTED, "hidden_act 'relu'");
    expect_error("{\"vision_config\": [1]}", A, MS_ERR_FORMAT, "vision_config: expected a JSON object");
    test_tmp(bad, sizeof bad, "clip_vision_bad.safetensors");
    FILE *f = fopen(bad, "wb");
    if (f) { fputs("not a safetensors file", f); fclose(f); }
    snprintf(text, sizeof text, cfg, 24, 3);
    expect_error(text, bad, MS_ERR_FORMAT, "clip_vision_bad.safetensors");
    remove(bad);
    /* preprocessor configs: sizes that CLIPImageProcessor refuses; a crop that does not fit */
    ClipImageProcessor pp;
    JsonValue *j = NULL;
    const char *t1 = "{\"size\": {\"height\": 32, \"width\": 32}}";
    MsStatus s = json_parse(t1, strlen(t1), "preprocessor_config.json", &j);
    if (!s) s = ms_clip_processor_from_json(j, &pp, 32);
    check(s == MS_ERR_UNSUPPORTED && strstr(ms_last_error(), "shortest_edge"), "%s -> %d: %s", t1, (int)s, ms_last_error());
    json_free(j);
    MsImage img;
    float px[3 * 32 * 32];
    if (!ms_image_read("tests/data/clip_vision/a/img0.png", 3, &img)) {
        ms_clip_processor_default(&pp, 32);
        pp.crop_h = pp.crop_w = 40;
        s = ms_clip_preprocess(px, 32, &img, &pp);
        check(s == MS_ERR_UNSUPPORTED, "crop 40 of a 39x32 resize for image_size 32 -> %d: %s", (int)s, ms_last_error());
        ms_image_free(&img);
    } else {
        check(0, "img0: %s", ms_last_error());
    }
}

int main(void) {
    test_case("a");
    test_case("b");
    test_case("c");
    test_errors();
    test_free_tracked();
    return test_summary("test_clip_vision");
}
