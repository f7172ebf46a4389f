/* tests/test_data.c — ED-LoRA training data against the official Python pipeline
 * (tools/ref/gen_data_golden.py: CPython 3.11 random, torch 1.13, Pillow 9.4, torchvision 0.14,
 * OpenCV 4.6 and Mix-of-Show's own pil_transform.py / lora_dataset.py):
 *   - random.*, torch.rand/randint/random_/randperm: every draw equal;
 *   - Pillow BILINEAR / NEAREST resizes and cv2 INTER_LINEAR on float64: every value equal;
 *   - each transform pipeline case: image bit-exact (CRC-32 of its float32 bytes, plus sampled
 *     values), masks to 1e-12, prompt identical, the same number of draws (next values equal),
 *     and an error wherever the official code raised;
 *   - LoraDataset + DataLoader (plain torch and accelerate's one-batch lookahead) over 3 epochs:
 *     the shuffled list, batch indices, prompts, image/mask CRCs, and draws between steps.
 * Run from the repository root. */
#include "tests/test.h"
#include "tools/tools.h"

#define DIR "tests/data/train_data/"

static StFile F;

static const StTensor *need(const char *name) {
    const StTensor *t = st_find(&F, name);
    if (!t) { check(0, "golden tensor %s present", name); }
    return t;
}
static double f64_at(const StTensor *t, size_t i) { return test_le_f64(t->data + 8 * i); }
static uint64_t u64_at(const StTensor *t, size_t i) { return test_le_u64(t->data + 8 * i); }
static float f32_at(const StTensor *t, size_t i) {
    uint32_t b = (uint32_t)t->data[i * 4] | (uint32_t)t->data[i * 4 + 1] << 8 | (uint32_t)t->data[i * 4 + 2] << 16 |
                 (uint32_t)t->data[i * 4 + 3] << 24;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* CRC-32 of floats as little-endian bytes (zlib.crc32 of numpy's '<f4' bytes). */
static uint32_t crc_f32(const float *x, size_t n) {
    uint32_t c = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b; uint8_t p[4];
        memcpy(&b, &x[i], 4);
        p[0] = (uint8_t)b; p[1] = (uint8_t)(b >> 8); p[2] = (uint8_t)(b >> 16); p[3] = (uint8_t)(b >> 24);
        c = ms_crc32(c, p, 4);
    }
    return c;
}
static uint32_t crc_f64(const double *x, size_t n) {
    uint32_t c = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t b; uint8_t p[8];
        memcpy(&b, &x[i], 8);
        for (int k = 0; k < 8; k++) p[k] = (uint8_t)(b >> (8 * k));
        c = ms_crc32(c, p, 8);
    }
    return c;
}

/* ---- 1. random and torch draws ---- */
static void test_random(void) {
    static const uint64_t seeds[] = { 0, 1, 42, ((uint64_t)1 << 32) + 5, 123456789012345ull, UINT64_MAX };
    static const char *const names[] = { "0", "1", "42", "4294967301", "123456789012345", "18446744073709551615" };
    for (int s = 0; s < 6; s++) {
        PyRandom r;
        char key[64];
        size_t bad = 0, n;
        const StTensor *t;
        py_random_seed(&r, seeds[s]);
        snprintf(key, sizeof key, "s%s.random", names[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += py_random_random(&r) != f64_at(t, i);
        static const int64_t rngs[] = { 0, 1, 2, 3, 7, 100, 511, 1000, (int64_t)1 << 31, (int64_t)1 << 40 };
        snprintf(key, sizeof key, "s%s.randint", names[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += (uint64_t)py_random_randint(&r, 0, rngs[i % 10]) != u64_at(t, i);
        snprintf(key, sizeof key, "s%s.randint_neg", names[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += (uint64_t)py_random_randint(&r, -5, 17) != u64_at(t, i);
        snprintf(key, sizeof key, "s%s.getrandbits", names[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += py_random_getrandbits(&r, 1 + (int)(i % 64)) != u64_at(t, i);
        snprintf(key, sizeof key, "s%s.uniform", names[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += py_random_uniform(&r, 0.5, 1.0) != f64_at(t, i);
        int64_t lst[37];
        for (int i = 0; i < 37; i++) lst[i] = i;
        py_random_shuffle(&r, lst, 37, sizeof lst[0]);
        snprintf(key, sizeof key, "s%s.shuffle", names[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < 37; i++) bad += (uint64_t)lst[i] != u64_at(t, i);
        snprintf(key, sizeof key, "s%s.choice", names[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += py_random_choice(&r, 27) != u64_at(t, i);
        snprintf(key, sizeof key, "s%s.after", names[s]);
        if (!(t = need(key))) return;
        bad += py_random_random(&r) != f64_at(t, 0);
        n = 500 + 300 + 50 + 200 + 50 + 37 + 50 + 1;
        check(bad == 0, "random.seed(%s): %zu draws equal to CPython (%zu differ)", names[s], n, bad);
    }
    static const uint64_t tseeds[] = { 0, 1, 1234 };
    for (int s = 0; s < 3; s++) {
        MsTorchRng g, pg;
        char key[64];
        size_t bad = 0;
        const StTensor *t;
        ms_torch_seed(&g, tseeds[s]);
        snprintf(key, sizeof key, "t%d.rand", (int)tseeds[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += ms_torch_rand_float(&g) != f32_at(t, i);
        static const int64_t rngs[] = { 1, 2, 3, 100, 513, (int64_t)1 << 31, (int64_t)1 << 32, ((int64_t)1 << 32) + 7, (int64_t)1 << 40 };
        snprintf(key, sizeof key, "t%d.randint", (int)tseeds[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += (uint64_t)ms_torch_randint(&g, 0, rngs[i % 9]) != u64_at(t, i);
        snprintf(key, sizeof key, "t%d.randint_low", (int)tseeds[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += (uint64_t)ms_torch_randint(&g, -7, 9) != u64_at(t, i);
        snprintf(key, sizeof key, "t%d.random_int64", (int)tseeds[s]);
        if (!(t = need(key))) return;
        for (size_t i = 0; i < t->numel; i++) bad += ms_torch_random_int64(&g) != u64_at(t, i);
        static const int64_t ns[] = { 1, 2, 5, 14, 100, 1000 };
        for (int k = 0; k < 6; k++) {
            int64_t perm[1000];
            ms_torch_seed(&pg, tseeds[s] * 7 + (uint64_t)ns[k]);
            ms_torch_randperm(&pg, perm, ns[k]);
            snprintf(key, sizeof key, "t%d.randperm%d", (int)tseeds[s], (int)ns[k]);
            if (!(t = need(key))) return;
            for (int64_t i = 0; i < ns[k]; i++) bad += (uint64_t)perm[i] != u64_at(t, (size_t)i);
        }
        check(bad == 0, "torch.manual_seed(%d): rand, randint, random_, randperm equal to torch (%zu differ)", (int)tseeds[s], bad);
    }
}

/* ---- 2. resizes ---- */
static const char *const IMG_NAMES[] = { "portrait", "landscape", "square" };

static void test_resize(void) {
    static const int sizes[4][2] = { { 23, 31 }, { 67, 90 }, { 40, 57 }, { 56, 20 } };
    size_t bad = 0, total = 0;
    for (int i = 0; i < 3; i++) {
        char key[96];
        snprintf(key, sizeof key, "in.%s.rgb", IMG_NAMES[i]);
        const StTensor *in = need(key);
        snprintf(key, sizeof key, "in.%s.mask", IMG_NAMES[i]);
        const StTensor *inm = need(key);
        if (!in || !inm) return;
        int h = (int)in->shape[0], w = (int)in->shape[1];
        for (int k = 0; k < 4; k++) {
            int ow = sizes[k][0], oh = sizes[k][1];
            uint8_t *o = (uint8_t *)malloc((size_t)ow * oh * 3);
            static const char *const kinds[] = { "bilinear", "nearest", "mask_bilinear" };
            for (int kind = 0; kind < 3; kind++) {
                int C = kind == 2 ? 1 : 3;
                MsStatus st = pil_resize(o, ow, oh, kind == 2 ? inm->data : in->data, w, h, C, kind == 1 ? PIL_NEAREST : PIL_BILINEAR);
                snprintf(key, sizeof key, "resize.%s.%s.%dx%d", IMG_NAMES[i], kinds[kind], ow, oh);
                const StTensor *want = need(key);
                if (!want || st != MS_OK) { bad++; continue; }
                for (size_t j = 0; j < want->numel; j++) bad += o[j] != want->data[j];
                total += want->numel;
            }
            free(o);
        }
    }
    check(bad == 0, "Pillow resize BILINEAR (RGB, L) and NEAREST: %zu bytes, %zu differ", total, bad);
    static const int cv[4][4] = { { 64, 64, 8, 8 }, { 40, 48, 5, 6 }, { 50, 50, 7, 7 }, { 12, 10, 30, 25 } };
    for (int k = 0; k < 4; k++) {
        char key[64];
        snprintf(key, sizeof key, "cv.%dx%d.in", cv[k][0], cv[k][1]);
        const StTensor *in = need(key);
        snprintf(key, sizeof key, "cv.%dx%d.out", cv[k][0], cv[k][1]);
        const StTensor *want = need(key);
        if (!in || !want) return;
        double *src = (double *)malloc(in->numel * sizeof *src), *o = (double *)malloc(want->numel * sizeof *o);
        for (size_t j = 0; j < in->numel; j++) src[j] = f64_at(in, j);
        cv_resize_linear_f64(o, cv[k][2], cv[k][3], src, cv[k][0], cv[k][1]);
        double worst = 0;
        for (size_t j = 0; j < want->numel; j++) worst = fmax(worst, fabs(o[j] - f64_at(want, j)));
        check(worst == 0.0, "cv2.resize %dx%d -> %dx%d INTER_LINEAR float64: max diff %.3g", cv[k][0], cv[k][1], cv[k][2], cv[k][3], worst);
        free(src); free(o);
    }
}

/* ---- 3. transform cases ---- */
/* A pipeline of the golden JSON -> MsTransformSpec (what tools/train_config.c does from the .yml). */
static int spec_from_json(const JsonValue *arr, MsTransformSpec *t, int cap) {
    int n = 0;
    for (size_t i = 0; i < json_len(arr) && n < cap; i++, n++) {
        const JsonValue *o = json_at(arr, i), *v;
        const char *type = json_get_string(o, "type", "");
        memset(&t[n], 0, sizeof t[n]);
        t[n].size = (int)json_get_int(o, "size", 0);
        t[n].crop_p = json_get_number(o, "crop_p", 0.5);
        t[n].p = json_get_number(o, "p", 0.5);
        t[n].keep_token_num = (int)json_get_int(o, "keep_token_num", 0);
        snprintf(t[n].enhance_type, sizeof t[n].enhance_type, "%s", json_get_string(o, "enhance_type", "object"));
        if ((v = json_get(o, "scale_ratio"))) { t[n].scale_ratio[0] = json_at(v, 0)->number; t[n].scale_ratio[1] = json_at(v, 1)->number; }
        if ((v = json_get(o, "mean"))) {
            t[n].n_mean = (int)json_len(v);
            for (int k = 0; k < t[n].n_mean && k < 3; k++) {
                t[n].mean[k] = json_at(v, (size_t)k)->number;
                t[n].std[k] = json_at(json_get(o, "std"), (size_t)k)->number;
            }
        }
        if (!strcmp(type, "HumanResizeCropFinalV3")) t[n].type = MS_TF_HUMAN_RESIZE_CROP_V3;
        else if (!strcmp(type, "ResizeFillMaskNew")) t[n].type = MS_TF_RESIZE_FILL_MASK_NEW;
        else if (!strcmp(type, "ToTensor")) t[n].type = MS_TF_TO_TENSOR;
        else if (!strcmp(type, "Normalize")) t[n].type = MS_TF_NORMALIZE;
        else if (!strcmp(type, "ShuffleCaption")) t[n].type = MS_TF_SHUFFLE_CAPTION;
        else if (!strcmp(type, "EnhanceText")) t[n].type = MS_TF_ENHANCE_TEXT;
        else if (!strcmp(type, "PairRandomHorizontalFlip")) t[n].type = MS_TF_PAIR_RANDOM_HFLIP;
        else return -1;
    }
    return n;
}

static void test_transforms(void) {
    JsonValue *j = NULL;
    if (!check(json_parse_file(DIR "transform_golden.json", &j) == MS_OK, "read transform_golden.json: %s", ms_last_error())) return;
    const JsonValue *cases = json_get(j, "cases"), *pipes = json_get(j, "pipelines");
    const char *prompt_in = json_get_string(j, "prompt_in", "");
    size_t stride = (size_t)json_get_int(j, "stride", 1009);
    int n_ok = 0, n_err = 0, bad_img = 0, bad_prompt = 0, bad_draws = 0, bad_err = 0;
    double worst_mask = 0;
    for (size_t c = 0; c < json_len(cases); c++) {
        const JsonValue *cs = json_at(cases, c);
        const char *key = json_get_string(cs, "key", ""), *img_name = json_get_string(cs, "image", "");
        MsTransformSpec spec[MS_MAX_TRANSFORMS];
        int n = spec_from_json(json_get(pipes, json_get_string(cs, "pipeline", "")), spec, MS_MAX_TRANSFORMS);
        int use_mask = json_get_bool(cs, "mask", 0);
        char k2[128];
        snprintf(k2, sizeof k2, "in.%s.rgb", img_name);
        const StTensor *in = need(k2);
        snprintf(k2, sizeof k2, "in.%s.mask", img_name);
        const StTensor *inm = need(k2);
        if (!in || !inm || n < 0) { check(0, "%s: inputs", key); continue; }
        PyRandom py;
        MsTorchRng g;
        TrainSample s;
        int64_t seed = json_get_int(cs, "seed", 0);
        py_random_seed_i64(&py, seed);
        ms_torch_seed(&g, (uint64_t)seed);
        MsStatus st = train_sample_init(&s, in->data, (int)in->shape[1], (int)in->shape[0], use_mask ? inm->data : NULL, prompt_in);
        if (st == MS_OK) st = train_transforms_run(spec, n, &s, &py, &g);
        if (json_get(cs, "error")) {
            n_err++;
            if (st == MS_OK) { bad_err++; printf("      %s: official raised '%s', we did not\n", key, json_get_string(cs, "error", "")); }
            else if (test_is_verbose()) printf("      %s: %s\n", key, ms_last_error());
            train_sample_free(&s);
            continue;
        }
        n_ok++;
        if (st != MS_OK || !s.tensor) {
            bad_img++;
            printf("      %s: error %s\n", key, ms_last_error());
            train_sample_free(&s);
            continue;
        }
        size_t numel = (size_t)3 * s.w * s.h;
        uint32_t crc = crc_f32(s.tensor, numel);
        if ((int64_t)crc != json_get_int(cs, "image_crc", -1)) {
            bad_img++;
            snprintf(k2, sizeof k2, "%s.image_sample", key);
            const StTensor *smp = need(k2);
            size_t first = (size_t)-1, nd = 0;
            for (size_t i = 0; smp && i < smp->numel && i * stride < numel; i++)
                if (memcmp(&s.tensor[i * stride], &(float){ f32_at(smp, i) }, 4)) { nd++; if (first == (size_t)-1) first = i; }
            printf("      %s: image CRC differs (%zu of the sampled values differ", key, nd);
            if (nd) printf(", first at %zu: %.9g vs %.9g", first * stride, (double)s.tensor[first * stride], (double)f32_at(smp, first));
            printf(")\n");
        }
        const char *want_prompt = json_get_string(cs, "prompt", "");
        if (strcmp(s.prompt, want_prompt)) { bad_prompt++; printf("      %s: prompt\n        got  '%s'\n        want '%s'\n", key, s.prompt, want_prompt); }
        snprintf(k2, sizeof k2, "%s.img_mask", key);
        const StTensor *im = need(k2);
        if (im && im->numel == (size_t)s.mw * s.mh)
            for (size_t i = 0; i < im->numel; i++) worst_mask = fmax(worst_mask, fabs(s.img_mask[i] - (double)f32_at(im, i)));
        else worst_mask = INFINITY;
        if (use_mask) {
            snprintf(k2, sizeof k2, "%s.mask", key);
            const StTensor *mk = need(k2);
            if (mk && s.mask && mk->numel == (size_t)s.mw * s.mh)
                for (size_t i = 0; i < mk->numel; i++) worst_mask = fmax(worst_mask, fabs(s.mask[i] - f64_at(mk, i)));
            else worst_mask = INFINITY;
        }
        double nr = py_random_random(&py);
        uint64_t nt = ms_torch_random_int64(&g);
        char nts[32];
        snprintf(nts, sizeof nts, "%llu", (unsigned long long)nt);     /* stored as a string: > 2^53 */
        if (nr != json_get_number(cs, "next_random", -1) || strcmp(nts, json_get_string(cs, "next_torch", ""))) {
            bad_draws++;
            printf("      %s: the next draws differ (random %.17g vs %.17g)\n", key, nr, json_get_number(cs, "next_random", -1));
        }
        train_sample_free(&s);
    }
    check(n_ok > 40 && bad_img == 0, "transforms: %d cases, images bit-exact (%d differ)", n_ok, bad_img);
    check(n_ok > 40 && worst_mask <= 1e-12, "transforms: masks and img_masks, max diff %.3g (tol 1e-12)", worst_mask);
    check(n_ok > 40 && bad_prompt == 0, "transforms: prompts identical (%d differ)", bad_prompt);
    check(n_ok > 40 && bad_draws == 0, "transforms: same draws from random and torch (%d differ)", bad_draws);
    check(n_err > 10 && bad_err == 0, "transforms: %d cases where the official code raises report an error (%d do not)", n_err, bad_err);
    json_free(j);

    /* process_text and a flip without a mask */
    static const char from[2][64] = { "<TOK>", "x" };
    static const char to[2][256] = { "<a1>  <a2>", "yy" };
    char *p = train_process_text(" \t<TOK>   x,  <TOK>\n", 2, from, to);
    check(p && !strcmp(p, "<a1> <a2> yy, <a1> <a2>"), "process_text: replace in order, strip, collapse spaces ('%s')", p ? p : "(null)");
    free(p);
    {
        TrainSample s;
        MsTransformSpec t;
        uint8_t px[12] = { 0 };
        memset(&t, 0, sizeof t);
        t.type = MS_TF_PAIR_RANDOM_HFLIP; t.p = 0.5;
        PyRandom py; MsTorchRng g;
        py_random_seed(&py, 0); ms_torch_seed(&g, 0);
        train_sample_init(&s, px, 2, 2, NULL, "x");
        check(train_transform_apply(&t, &s, &py, &g) != MS_OK, "PairRandomHorizontalFlip without a mask is an error (official: KeyError)");
        train_sample_free(&s);
    }
}

/* The mixshow *Place transforms: the official resize transforms placing on their own canvas.
 * At size 512 they are the official ones (same image, masks and draws); at world sizes (64)
 * they work where the official raises or paints outside its canvas, the image lands inside the
 * canvas, and img_mask is the placed rectangle's coverage. */
static void test_place(void) {
    const int W = 150, H = 110;
    uint8_t *rgb = malloc((size_t)W * H * 3), *mk = malloc((size_t)W * H);
    for (int i = 0; i < W * H; i++) { rgb[3 * i] = (uint8_t)(i * 7); rgb[3 * i + 1] = (uint8_t)(i >> 3); rgb[3 * i + 2] = 200; mk[i] = (uint8_t)(i % 3 ? 255 : 0); }
    int same512 = 1, n_off = 0, n_place_ok = 0, bad_inside = 0;
    for (int k = 0; k < 2; k++)                 /* HumanResizeCropFinalV3, ResizeFillMaskNew */
        for (int seed = 0; seed < 12; seed++)
            for (int S = 64; S <= 512; S += 448) {
                TrainSample a, b;
                MsTransformSpec t[2];
                memset(t, 0, sizeof t);
                t[0].type = k ? MS_TF_RESIZE_FILL_MASK_NEW : MS_TF_HUMAN_RESIZE_CROP_V3;
                t[0].size = S; t[0].crop_p = 0.5; t[0].scale_ratio[0] = 0.5; t[0].scale_ratio[1] = 0.9;
                t[1] = t[0]; t[1].place = 1;
                PyRandom pa, pb; MsTorchRng ga, gb;
                py_random_seed(&pa, (uint64_t)seed); py_random_seed(&pb, (uint64_t)seed);
                ms_torch_seed(&ga, (uint64_t)seed); ms_torch_seed(&gb, (uint64_t)seed);
                train_sample_init(&a, rgb, W, H, mk, "x");
                train_sample_init(&b, rgb, W, H, mk, "x");
                MsStatus sa = train_transform_apply(&t[0], &a, &pa, &ga), sb = train_transform_apply(&t[1], &b, &pb, &gb);
                if (S == 512) {
                    same512 &= sa == sb && (sa != MS_OK || (a.w == b.w && a.h == b.h && !memcmp(a.rgb, b.rgb, (size_t)a.w * a.h * 3) &&
                               !memcmp(a.img_mask, b.img_mask, sizeof(double) * a.mw * a.mh) &&
                               !memcmp(a.mask, b.mask, sizeof(double) * a.mw * a.mh) && py_random_random(&pa) == py_random_random(&pb)));
                } else {
                    n_off += sa != MS_OK;
                    if (sb == MS_OK && b.w == S && b.h == S) {
                        n_place_ok++;
                        /* every canvas pixel outside the placed image is black, img_mask in [0,1] and > 0 somewhere */
                        double sum = 0;
                        for (int i = 0; i < b.mw * b.mh; i++) { sum += b.img_mask[i]; bad_inside += b.img_mask[i] < 0 || b.img_mask[i] > 1; }
                        bad_inside += !(sum > 0);
                    } else if (test_is_verbose()) printf("      place %d seed %d: %s\n", k, seed, ms_last_error());
                }
                train_sample_free(&a); train_sample_free(&b);
            }
    check(same512, "HumanResizeCropPlace / ResizeFillMaskPlace at 512 == the official transforms (image, masks, next draw)");
    check(n_off > 0, "at size 64 the official transforms fail on %d of 24 cases (the hard-coded 512)", n_off);
    check(n_place_ok == 24 && bad_inside == 0, "at size 64 the *Place transforms work on %d of 24 cases, img_mask in [0,1] "
          "and nonzero (%d bad)", n_place_ok, bad_inside);
    free(rgb); free(mk);
}

/* ---- 4. LoraDataset + DataLoader ---- */
static void test_loader(void) {
    JsonValue *j = NULL;
    if (!check(json_parse_file(DIR "loader_golden.json", &j) == MS_OK, "read loader_golden.json: %s", ms_last_error())) return;
    const JsonValue *opt = json_get(j, "option"), *rm = json_get(opt, "replace_mapping");
    TrainDataConfig c;
    memset(&c, 0, sizeof c);
    snprintf(c.concept_list, sizeof c.concept_list, "%s", json_get_string(opt, "concept_list", ""));
    c.use_caption = json_get_bool(opt, "use_caption", 0);
    c.use_mask = json_get_bool(opt, "use_mask", 0);
    c.n_transforms = spec_from_json(json_get(opt, "instance_transform"), c.transforms, MS_MAX_TRANSFORMS);
    for (size_t i = 0; i < json_len(rm) && i < MS_MAX_REPLACE; i++, c.n_replace++) {
        snprintf(c.replace_from[i], sizeof c.replace_from[i], "%s", json_at(rm, i)->key);
        snprintf(c.replace_to[i], sizeof c.replace_to[i], "%s", json_at(rm, i)->str);
    }
    c.batch_size = (int)json_get_int(opt, "batch_size_per_gpu", 1);
    c.enlarge_ratio = (int)json_get_int(opt, "dataset_enlarge_ratio", 1);
    size_t stride = (size_t)json_get_int(j, "stride", 10007);
    TrainDatasetOptions o = { NULL, 1 };
    static const char *const modes[] = { "plain", "lookahead" };
    for (int mode = 0; mode < 2; mode++) {
        const JsonValue *run = json_get(json_get(j, "runs"), modes[mode]), *listing = json_get(run, "listing"),
                        *batches = json_get(run, "batches");
        PyRandom py;
        MsTorchRng g;
        TrainDataset *d = NULL;
        py_random_seed(&py, 0);                  /* accelerate set_seed(0) */
        ms_torch_seed(&g, 0);
        MsStatus st = train_dataset_open(&d, &c, &o, &py);
        if (!check(st == MS_OK, "%s: dataset opens: %s", modes[mode], st == MS_OK ? "" : ms_last_error())) continue;
        int bad = (size_t)json_get_int(run, "len", 0) != train_dataset_len(d) || json_len(listing) != train_dataset_n_images(d);
        for (size_t i = 0; !bad && i < json_len(listing); i++) {
            const JsonValue *e = json_at(listing, i);
            const char *img = train_dataset_image_path(d, i), *mk = train_dataset_mask_path(d, i), *sl;
            const char *wm = json_get_string(e, "mask", "");
            sl = strrchr(img, '/'); img = sl ? sl + 1 : img;
            sl = mk ? strrchr(mk, '/') : NULL; mk = sl ? sl + 1 : mk;
            if (strcmp(img, json_get_string(e, "image", "")) || strcmp(train_dataset_prompt(d, i), json_get_string(e, "prompt", "")) ||
                !mk || strcmp(mk, wm)) {
                bad = 1;
                printf("      entry %zu: got %s '%s' %s, want %s '%s' %s\n", i, img, train_dataset_prompt(d, i), mk ? mk : "-",
                       json_get_string(e, "image", ""), json_get_string(e, "prompt", ""), wm);
            }
        }
        check(!bad, "%s: LoraDataset list after random.shuffle (%zu images, len %zu): names, prompts, masks", modes[mode],
              train_dataset_n_images(d), train_dataset_len(d));
        TrainLoader l;
        size_t B = (size_t)c.batch_size, S = (size_t)train_dataset_size(d);
        if (!check(train_loader_init(&l, d, B, mode) == MS_OK, "loader init: %s", ms_last_error())) { train_dataset_close(d); continue; }
        float *images = (float *)malloc(B * 3 * S * S * sizeof *images);
        double *masks = (double *)malloc(B * (S / 8) * (S / 8) * sizeof *masks), *img_masks = (double *)malloc(B * (S / 8) * (S / 8) * sizeof *img_masks);
        char *prompts[16];
        size_t idx[16], *fetched = (size_t *)malloc(sizeof(size_t) * 4096), nf = 0;
        for (size_t b = 0; b < json_len(batches); b++) {
            const JsonValue *fb = json_get(json_at(batches, b), "fetched_before");
            for (size_t i = 0; i < json_len(fb) && nf < 4096; i++) fetched[nf++] = (size_t)json_at(fb, i)->number;
        }
        int bad_idx = 0, bad_p = 0, bad_crc = 0, bad_step = 0, errs = 0;
        for (size_t b = 0; b < json_len(batches); b++) {
            const JsonValue *bj = json_at(batches, b);
            st = train_loader_next(&l, d, &py, &g, images, masks, img_masks, prompts, idx);
            if (st != MS_OK) { errs++; printf("      batch %zu: %s\n", b, ms_last_error()); break; }
            for (size_t i = 0; i < B; i++) {
                bad_idx += b * B + i >= nf || idx[i] != fetched[b * B + i];
                { const JsonValue *pv = json_at(json_get(bj, "prompts"), i); bad_p += !pv || pv->type != JSON_STRING || strcmp(prompts[i], pv->str) != 0; }
                free(prompts[i]);
            }
            size_t nm = B * (S / 8) * (S / 8);
            int ci = (int64_t)crc_f32(images, B * 3 * S * S) != json_get_int(bj, "images_crc", -1);
            int cm = (int64_t)crc_f64(masks, nm) != json_get_int(bj, "masks_crc", -1);
            int cim = (int64_t)crc_f64(img_masks, nm) != json_get_int(bj, "img_masks_crc", -1);
            if (ci || cm || cim) {
                const JsonValue *smp = json_get(bj, "image0_sample");
                size_t nd = 0;
                for (size_t i = 0; i < json_len(smp); i++) nd += images[i * stride] != (float)json_at(smp, i)->number;
                printf("      %s batch %zu: CRC differs: images %d (%zu sampled values differ) masks %d img_masks %d\n", modes[mode], b, ci, nd, cm, cim);
                bad_crc++;
            }
            const JsonValue *sr = json_get(bj, "step_rand");       /* the training step's draws */
            for (size_t i = 0; i < 3; i++) bad_step += ms_torch_rand_float(&g) != (float)json_at(sr, i)->number;
            bad_step += py_random_random(&py) != json_get_number(bj, "step_random", -1);
        }
        check(!errs && !bad_idx, "%s: %zu batches over 3 epochs: dataset indices in torch's order (%d differ)", modes[mode], json_len(batches), bad_idx);
        check(!errs && !bad_p, "%s: prompts identical (%d differ)", modes[mode], bad_p);
        check(!errs && !bad_crc, "%s: images bit-exact, masks and img_masks equal (CRC; %d batches differ)", modes[mode], bad_crc);
        check(!errs && !bad_step, "%s: draws between steps equal (generators in step with the official loop; %d differ)", modes[mode], bad_step);
        free(images); free(masks); free(img_masks); free(fetched);
        train_loader_free(&l);
        train_dataset_close(d);
    }
    /* readdir order lists the same files */
    {
        PyRandom py;
        TrainDataset *d = NULL;
        TrainDatasetOptions o2 = { NULL, 0 };
        py_random_seed(&py, 0);
        MsStatus st = train_dataset_open(&d, &c, &o2, &py);
        check(st == MS_OK && train_dataset_n_images(d) == 5, "readdir order: opens with the same 5 images (.DS_Store, subdir skipped)");
        train_dataset_close(d);
    }
    /* errors name the file */
    {
        PyRandom py;
        TrainDataset *d = NULL;
        TrainDataConfig c2 = c;
        snprintf(c2.concept_list, sizeof c2.concept_list, "%s", DIR "no_such_list.json");
        py_random_seed(&py, 0);
        check(train_dataset_open(&d, &c2, &o, &py) != MS_OK && strstr(ms_last_error(), "no_such_list.json"),
              "missing concept list: error names it (%s)", ms_last_error());
        c2 = c;
        c2.n_transforms = 1;                      /* no ToTensor */
        check(train_dataset_open(&d, &c2, &o, &py) != MS_OK, "transforms without ToTensor: error (%s)", ms_last_error());
    }
    json_free(j);
}

int main(void) {
    MsStatus st = st_open(&F, DIR "random_golden.safetensors");
    if (check(st == MS_OK, "open random_golden.safetensors: %s", st == MS_OK ? "" : ms_last_error())) {
        test_random();
        st_close(&F);
    }
    st = st_open(&F, DIR "transform_golden.safetensors");
    if (check(st == MS_OK, "open transform_golden.safetensors: %s", st == MS_OK ? "" : ms_last_error())) {
        test_resize();
        test_transforms();
        test_place();
        st_close(&F);
    }
    test_loader();
    return test_summary("test_data");
}
