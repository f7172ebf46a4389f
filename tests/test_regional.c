/* tests/test_regional.c — regionally controllable sampling (mixshow_regional.c, the regional
 * attention of models/unet.c, tools/regional.c) against the official Mix-of-Show code
 * (tools/ref/gen_regional_golden.py: RegionallyT2IAdapterPipeline + prepare_text, commit 51270fd,
 * diffusers 0.19.3, float32) on tests/data/regional/fused (a fused tiny model, 4 concept words):
 *   - every `python regionally_controlable_sampling.py` call of regionally_sample.sh: our
 *     --prompt_rewrite parser == prepare_text (prompts, negatives, boxes as doubles, exactly);
 *   - `mixshow sample` with the official options, 3 overlapping regions, 128x64, 8 DPM steps,
 *     keypose / keypose + sketch / no adapter: latents_init and every step's latents rel-L2
 *     <= 1e-4 (eps too), PNG pixels within 1 level of the official PIL image;
 *   - the regions matter: the same run without them moves the final latents by > 10%;
 *   - per-region adapter weights (the official pipeline crashes on them; the paper's meaning):
 *     weight maps at every level (box weight inside, global outside, later boxes win), weight 1
 *     over the whole image == global weight 1 (bitwise), weight 0 over the whole image == no
 *     adapter (bitwise), a weight-0 box changes the result;
 *   - bad input: malformed strings, boxes outside the image or empty, conditions of different
 *     sizes, an adapter with the wrong input channels: errors that name the part. */
#include "test.h"

#include "tools/tools.h"

#define DIR "tests/data/regional"
#define FUSED DIR "/fused"

static double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) { double d = (double)a[i] - b[i]; num += d * d; den += (double)b[i] * b[i]; }
    return sqrt(num / (den > 0 ? den : 1e-300));
}

static void test_parse(void) {
    JsonValue *j = NULL;
    if (!check(json_parse_file(DIR "/parse.json", &j) == MS_OK, "parse.json: %s", ms_last_error())) return;
    const JsonValue *calls = json_get(j, "calls");
    int n_ok = 0, n_reg = 0;
    for (size_t c = 0; c < json_len(calls); c++) {
        const JsonValue *call = json_at(calls, c), *argv = json_get(call, "argv"), *regs = json_get(call, "regions");
        int H = (int)json_get_int(call, "height", 0), W = (int)json_get_int(call, "width", 0);
        const char *rw = NULL;
        for (size_t k = 0; k < json_len(argv); k++) {
            const JsonValue *a = json_at(argv, k);
            if (a->type == JSON_STRING && !strncmp(a->str, "--prompt_rewrite=", 17)) rw = a->str + 17;
        }
        RegionList rl;
        if (!check(rw && regional_parse_rewrite(rw, H, W, &rl) == MS_OK, ".sh call %zu: %s", c, ms_last_error())) continue;
        int ok = rl.n == (int)json_len(regs);
        for (int r = 0; ok && r < rl.n; r++) {
            const JsonValue *g = json_at(regs, (size_t)r), *box = json_get(g, "box");
            ok = !strcmp(rl.r[r].prompt, json_get_string(g, "prompt", "")) &&
                 !strcmp(rl.r[r].negative, json_get_string(g, "negative", "")) && json_len(box) == 4;
            for (int k = 0; ok && k < 4; k++) ok = rl.r[r].box[k] == json_at(box, (size_t)k)->number;
            if (!ok) fprintf(stderr, "  region %d: '%s' / '%s' [%.17g %.17g %.17g %.17g]\n", r, rl.r[r].prompt,
                             rl.r[r].negative, rl.r[r].box[0], rl.r[r].box[1], rl.r[r].box[2], rl.r[r].box[3]);
        }
        n_ok += ok;
        n_reg += rl.n;
        regional_list_free(&rl);
    }
    check(json_len(calls) >= 2 && n_ok == (int)json_len(calls), "regionally_sample.sh: %d of %zu calls (%d regions) parse as "
          "prepare_text does (prompts, negatives, boxes exactly)", n_ok, json_len(calls), n_reg);
    json_free(j);

    /* the official item syntax: '|' splits, the first empty item stops, [] is the whole image */
    RegionList rl;
    MsStatus s = regional_parse_rewrite("[a]-*-[b]-*-[]|[c [x]]-*-[]-*-[0, 1.5, 32, 64]||[ignored]-*-[]-*-[1,1,2,2]", 64, 128, &rl);
    check(s == MS_OK && rl.n == 2 && !strcmp(rl.r[1].prompt, "c x") && rl.r[0].full && rl.r[0].box[2] == 1.0 &&
          rl.r[1].box[1] == 1.5 / 128 && rl.r[1].box[2] == 0.5, "prepare_text details: [] -> [0,0,1,1], brackets removed, "
          "stop at an empty item");
    if (s == MS_OK) regional_list_free(&rl);
    /* bad strings */
    static const struct { const char *s, *needle; } bad[] = {
        { "[a]-*-[b]", "separator" },
        { "[a]-*-[b]-*-[1, 2, 3]", "position" },
        { "[a]-*-[b]-*-[0, 0, 65, 10]", "outside" },
        { "[a]-*-[b]-*-[10, 0, 10, 10]", "zero area" },
        { "[a]-*-[b]-*-[0, 0, 10, 10]|[c]-*-[d]-*-[0, 0, 10, x]", "region 2" },
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        s = regional_parse_rewrite(bad[k].s, 64, 128, &rl);
        check(s == MS_ERR_ARG && strstr(ms_last_error(), bad[k].needle), "bad --prompt_rewrite \"%s\": %s", bad[k].s,
              ms_last_error());
    }
    int n = 0;
    double box[4][4];
    float w[4];
    s = regional_parse_weights("[0, 0, 32, 64]-0.5|[8, 8, 64, 128]-1", "--region_keypose_adaptor_weight", 64, 128, &n, box, w, 4);
    check(s == MS_OK && n == 2 && w[0] == 0.5f && w[1] == 1.0f && box[1][3] == 128, "adapter region weights parse");
    s = regional_parse_weights("[0, 0, 32, 64]", "--region_sketch_adaptor_weight", 64, 128, &n, box, w, 4);
    check(s == MS_ERR_ARG && strstr(ms_last_error(), "--region_sketch_adaptor_weight"), "weights without '-': %s", ms_last_error());
    s = regional_parse_weights("[0, 0, 32, 640]-1", "--region_sketch_adaptor_weight", 64, 128, &n, box, w, 4);
    check(s == MS_ERR_ARG && strstr(ms_last_error(), "outside"), "weight box outside: %s", ms_last_error());
}

/* runs `mixshow sample ARGS --trace TRACE -o PNG` in-process */
static int run_sample(const char *const *args, int n, const char *trace, const char *png) {
    char *argv[64];
    int argc = 0;
    argv[argc++] = (char *)"sample";
    for (int i = 0; i < n && argc < 58; i++) argv[argc++] = (char *)args[i];
    if (trace) { argv[argc++] = (char *)"--trace"; argv[argc++] = (char *)trace; }
    argv[argc++] = (char *)"-o"; argv[argc++] = (char *)png;
    argv[argc] = NULL;
    return cmd_sample(argc, argv);
}

static float *trace_get(StFile *f, const char *key, size_t *n) {
    float *x = NULL;
    if (st_load_f32(f, key, &x, n)) return NULL;
    return x;
}

static void test_golden(const char *cas, float **final_out, size_t *n_out) {
    char path[256], trace[512], png[512];
    StFile G, T;
    snprintf(path, sizeof path, DIR "/%s.trace.safetensors", cas);
    if (!check(st_open(&G, path) == MS_OK, "%s: %s", path, ms_last_error())) return;
    JsonValue *argv = NULL;
    const char *meta = st_meta(&G, "argv"), *steps_s = st_meta(&G, "steps");
    if (!check(meta && steps_s && json_parse(meta, strlen(meta), path, &argv) == MS_OK, "%s: argv metadata", path)) {
        st_close(&G);
        return;
    }
    const char *args[40];
    int n = 0;
    int no_adapter = !strcmp(cas, "none");
    for (size_t k = 0; k < json_len(argv) && n < 36; k++) {
        const char *a = json_at(argv, k)->str;
        if (no_adapter && !strncmp(a, "--keypose", 9)) continue;   /* the official run used weight 0.0 */
        args[n++] = a;
    }
    if (no_adapter) { args[n++] = "-W"; args[n++] = "128"; args[n++] = "-H"; args[n++] = "64"; }
    char nm[96];
    snprintf(nm, sizeof nm, "regional_%s.safetensors", cas);
    test_tmp(trace, sizeof trace, nm);
    snprintf(nm, sizeof nm, "regional_%s.png", cas);
    test_tmp(png, sizeof png, nm);
    int rc = run_sample(args, n, trace, png);
    if (check(rc == 0, "%s: mixshow sample exit %d: %s", cas, rc, ms_last_error()) && check(st_open(&T, trace) == MS_OK, "%s", trace)) {
        const int steps = atoi(steps_s);
        double worst_lat = 0, worst_eps = 0;
        int missing = 0;
        for (int i = -1; i < steps; i++) {
            for (int e = 0; e < 2; e++) {
                char key[48];
                if (i < 0 && e) continue;
                if (i < 0) snprintf(key, sizeof key, "latents_init");
                else snprintf(key, sizeof key, e ? "step%d.eps" : "step%d.latents", i);
                size_t na = 0, nb = 0;
                float *a = trace_get(&T, key, &na), *b = trace_get(&G, key, &nb);
                if (!a || !b || na != nb) missing++;
                else {
                    double r = rel_l2(a, b, na);
                    if (e) { if (r > worst_eps) worst_eps = r; }
                    else if (r > worst_lat) worst_lat = r;
                    if (i == steps - 1 && !e && final_out) { *final_out = a; *n_out = na; a = NULL; }
                }
                ms_free_aligned(a); ms_free_aligned(b);
            }
        }
        check(!missing && worst_lat <= 1e-4 && worst_eps <= 1e-4, "%-5s latents (init + %d steps) rel-L2 max %.2e, eps %.2e "
              "(tol 1e-4) vs the official pipeline", cas, steps, worst_lat, worst_eps);
        st_close(&T);
        MsImage img;
        const StTensor *u8 = st_find(&G, "u8");
        if (check(ms_image_read(png, 3, &img) == MS_OK && u8 && u8->numel == (size_t)img.w * img.h * 3, "%s: %s", png, ms_last_error())) {
            int maxd = 0;
            for (size_t k = 0; k < u8->numel; k++) {
                int d = abs((int)((uint8_t *)img.data)[k] - (int)u8->data[k]);
                if (d > maxd) maxd = d;
            }
            check(maxd <= 1, "%-5s PNG pixels max diff %d vs the official image (tol 1)", cas, maxd);
            ms_image_free(&img);
        }
        remove(trace);
    }
    json_free(argv);
    st_close(&G);
}

/* without --prompt_rewrite the same run must end elsewhere: the regions are active */
static void test_regions_matter(const float *with, size_t n) {
    const char *args[] = { "--pretrained_model=" FUSED, "--prompt=a cat and a dog near a forest",
                           "--negative_prompt=lowres, bad anatomy", "--seed=23", "--steps=8", "-W", "128", "-H", "64",
                           "--prompt_rewrite=" };
    char trace[512], png[512];
    test_tmp(trace, sizeof trace, "regional_noreg.safetensors");
    test_tmp(png, sizeof png, "regional_noreg.png");
    StFile T;
    if (!check(run_sample(args, 10, trace, png) == 0 && st_open(&T, trace) == MS_OK,
               "run without regions: %s", ms_last_error()))
        return;
    size_t m = 0;
    float *x = trace_get(&T, "step7.latents", &m);
    check(x && m == n && rel_l2(x, with, n) > 0.1, "the regions change the final latents by %.3f (rel-L2; > 0.1 expected)",
          x && m == n ? rel_l2(x, with, n) : -1.0);
    ms_free_aligned(x);
    st_close(&T);
    remove(trace);
    remove(png);
}

/* ---- per-region adapter weights ---- */
static void test_weight_maps(void) {
    const int Hp = 64, Wp = 128;
    double box[3][4] = { { 0, 0, 40, 60 }, { 20, 50, 64, 128 }, { 7, 9, 13, 21 } };
    float bw[3] = { 0.0f, 2.0f, 0.5f };
    MsRegionalAdapter a;
    memset(&a, 0, sizeof a);
    a.weight = 0.7f; a.n_box = 3; a.box = (const double (*)[4])box; a.box_weight = bw;
    int bad = 0, inside0 = 0, outside = 0;
    for (int fh = Hp / 8, fw = Wp / 8; fh >= 1; fh /= 2, fw /= 2) {
        float map[16 * 8];
        ms_regional_weight_map(map, fh, fw, Hp, Wp, &a);
        for (int y = 0; y < fh; y++)
            for (int x = 0; x < fw; x++) {
                float want = 0.7f;                       /* later boxes overwrite earlier ones */
                for (int r = 0; r < 3; r++) {
                    int y0 = (int)ceil(box[r][0] / Hp * fh), x0 = (int)ceil(box[r][1] / Wp * fw);
                    int y1 = (int)floor(box[r][2] / Hp * fh), x1 = (int)floor(box[r][3] / Wp * fw);
                    if (y >= y0 && y < y1 && x >= x0 && x < x1) want = bw[r];
                }
                bad += map[y * fw + x] != want;
                inside0 += want == 0.0f;
                outside += want == 0.7f;
            }
    }
    check(!bad && inside0 > 0 && outside > 0, "adapter weight maps at 4 levels: box weights inside (last wins), global "
          "outside (%d zero, %d global pixels; %d wrong)", inside0, outside, bad);
}

static MsStatus sample_lat(const MsModel *m, const ClipTokenizer *tok, const RegionalConcepts *rc, const AdapterParams *ap,
                           const float *cond, float weight, int n_box, const double (*box)[4], const float *bw, float *lat_out) {
    MsRegionalOptions o;
    MsRegion reg[2] = { { "a <cat1> <cat2>", "lowres", { 0, 0, 0.75, 0.5 } }, { "a <dog1> <dog2>", "", { 0.25, 0.4, 1, 1 } } };
    float *img = (float *)ms_alloc_aligned((size_t)3 * 64 * 128, sizeof(float));
    memset(&o, 0, sizeof o);
    o.base.prompt = "two animals"; o.base.negative = "bad"; o.base.width = 128; o.base.height = 64; o.base.steps = 3;
    o.base.guidance_scale = 7.5f; o.base.seed = 5; o.base.sampler = MS_SCHED_DPMSOLVER; o.base.torch_cpu = MS_TORCH_CPU_AVX2;
    o.base.batch = 1; o.base.n_layer_ctx = rc->n_layers; o.base.n_bind = rc->n_words; o.base.bind_word = rc->word_ptr;
    o.base.bind_token = rc->token_ptr;
    o.n_regions = 2; o.regions = reg;
    o.keypose.adapter = ap; o.keypose.cond = cond; o.keypose.weight = weight;
    o.keypose.n_box = n_box; o.keypose.box = box; o.keypose.box_weight = bw;
    MsStatus s = img ? ms_regional_sample(m, tok, &o, img) : MS_ERR_NOMEM;
    if (!s) memcpy(lat_out, img, (size_t)3 * 64 * 128 * sizeof(float));   /* the decoded image stands for the run */
    ms_free_aligned(img);
    return s;
}

static void test_adapter_weights(void) {
    MsModel m;
    ClipTokenizer tok;
    RegionalConcepts rc;
    AdapterConfig ac;
    MsParamTable at;
    AdapterParams ap;
    float *cond = NULL;
    const size_t n = (size_t)3 * 64 * 128;
    if (!check(ms_model_load(FUSED, NULL, &m) == MS_OK, "load %s: %s", FUSED, ms_last_error())) return;
    if (!check(ms_clip_tokenizer_load(FUSED, &tok) == MS_OK &&
               regional_concepts_load(FUSED, &tok, ms_unet_cross_attn_layers(&m.unet_config), &rc) == MS_OK &&
               ms_adapter_load(FUSED "/t2iadapter_openpose", NULL, &ac, &at) == MS_OK &&
               adapter_params_init(&ap, &ac, &at) == MS_OK && sample_load_cond(DIR "/keypose.png", 3, 128, 64, &cond) == MS_OK,
               "fused model, concepts, keypose adapter: %s", ms_last_error())) {
        ms_model_free(&m);
        return;
    }
    check(rc.n_words == 4 && rc.n_layers == 16 && !strcmp(rc.token_ptr[16 + 3], "<new19>"),
          "new_concept_cfg.json: 4 words x 16 tokens (<cat2> layer 3 -> <new19>)");
    float *a = test_track(test_zeros(n)), *b = test_track(test_zeros(n)), *c = test_track(test_zeros(n));
    double whole[1][4] = { { 0, 0, 64, 128 } }, part[1][4] = { { 0, 0, 64, 64 } };
    float one = 1.0f, zero = 0.0f;
    MsStatus s1 = sample_lat(&m, &tok, &rc, &ap, cond, 1.0f, 0, NULL, NULL, a);
    MsStatus s2 = sample_lat(&m, &tok, &rc, &ap, cond, 0.3f, 1, (const double (*)[4])whole, &one, b);
    if (check(!s1 && !s2, "regional sampling with a keypose adapter: %s", ms_last_error()))
        check_bitwise("region weight 1 over the whole image == global weight 1", b, a, n);
    MsStatus s3 = sample_lat(&m, &tok, &rc, NULL, NULL, 1.0f, 0, NULL, NULL, c);
    MsStatus s4 = sample_lat(&m, &tok, &rc, &ap, cond, 0.8f, 1, (const double (*)[4])whole, &zero, b);
    if (check(!s3 && !s4, "%s", ms_last_error()))
        check_bitwise("region weight 0 over the whole image == no adapter", b, c, n);
    MsStatus s5 = sample_lat(&m, &tok, &rc, &ap, cond, 1.0f, 1, (const double (*)[4])part, &zero, b);
    if (check(!s5, "%s", ms_last_error()))
        check(rel_l2(b, a, n) > 1e-3 && rel_l2(b, c, n) > 1e-3, "a weight-0 box changes the result (%.2e vs adapter, %.2e vs none)",
              rel_l2(b, a, n), rel_l2(b, c, n));
    /* an adapter with the wrong input channels */
    {
        AdapterConfig sc;
        MsParamTable st;
        AdapterParams sp;
        if (ms_adapter_load(FUSED "/t2iadapter_sketch", NULL, &sc, &st) == MS_OK && adapter_params_init(&sp, &sc, &st) == MS_OK) {
            MsStatus s = sample_lat(&m, &tok, &rc, &sp, cond, 1.0f, 0, NULL, NULL, b);
            check(s == MS_ERR_ARG && strstr(ms_last_error(), "keypose"), "sketch adapter as keypose: %s", ms_last_error());
            ms_param_table_free(&st);
        }
    }
    ms_free_aligned(cond);
    ms_param_table_free(&at);
    regional_concepts_free(&rc);
    clip_tokenizer_free(&tok);
    ms_model_free(&m);
}

static void test_bad_cli(void) {
    /* a condition whose size differs from the other one */
    uint8_t px[64 * 64];
    memset(px, 128, sizeof px);
    char small[512], opt[540], bad[512];
    test_tmp(small, sizeof small, "regional_small.png");
    test_tmp(bad, sizeof bad, "regional_bad.png");
    snprintf(opt, sizeof opt, "--sketch_condition=%s", small);
    if (ms_png_write(small, px, 64, 64, 1) == MS_OK) {
        const char *args[] = { "--pretrained_model=" FUSED, "--keypose_condition=" DIR "/keypose.png", opt, "--steps=1" };
        int rc = run_sample(args, 4, NULL, bad);
        check(rc != 0 && strstr(ms_last_error(), "same size"), "conditions of different sizes: %s", ms_last_error());
        remove(small);
    }
    const char *args2[] = { "--pretrained_model=" FUSED, "--keypose_condition=" DIR "/keypose.png", "--steps=1",
                            "--prompt_rewrite=[a]-*-[b]-*-[0, 0, 64, 129]" };
    int rc = run_sample(args2, 4, NULL, bad);
    check(rc != 0 && strstr(ms_last_error(), "outside the 128 x 64 image"), "box outside the condition's size: %s", ms_last_error());
}

int main(void) {
    ms_set_threads(1);
    test_parse();
    float *final = NULL;
    size_t nf = 0;
    test_golden("kp", NULL, NULL);
    test_golden("kpsk", NULL, NULL);
    test_golden("none", &final, &nf);
    if (final) test_regions_matter(final, nf);
    ms_free_aligned(final);
    test_weight_maps();
    test_adapter_weights();
    test_bad_cli();
    test_free_tracked();
    return test_summary("test_regional");
}
