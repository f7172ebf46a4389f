/* tests/test_clip.c — models/clip.c against HF transformers 4.31 (tools/ref/gen_clip_golden.py):
 *   tokenizer: every input id of ~900 prompts under three added-token sets equals CLIPTokenizer's;
 *   text encoder: last_hidden_state of the tiny-sd encoder (training mode with LoRA and new token
 *     rows; inference mode plain) and of a 2-layer SD-1.5-width stack with generated weights;
 *     gradients of L = sum(R * out) w.r.t. the new embedding rows and LoRA down/up;
 *   gradchecks (central differences) of the encoder w.r.t. new rows and LoRA on the tiny config;
 *   training and inference forwards agree bitwise; bad input gives errors. */
#include "tests/test.h"
#include "tools/tools.h"

static StFile G;
static ClipTokenizer TK[3];

/* ---- generated values, identical to gen_value() in tools/ref/gen_clip_golden.py ---- */
static void gen_uniform(const char *name, float *x, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) h = (h ^ *p) * 0x100000001b3ull;
    for (size_t i = 0; i < n; i++) {
        uint64_t z = h + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        x[i] = (float)((double)((int64_t)(z >> 40) - (1 << 23)) / (double)(1 << 23));
    }
}

static int ends_with(const char *s, const char *e) {
    size_t a = strlen(s), b = strlen(e);
    return a >= b && !strcmp(s + a - b, e);
}

static void gen_value(const char *name, float *x, size_t n) {
    gen_uniform(name, x, n);
    float s = 1.0f / 32, off = 0.0f;
    if (ends_with(name, "layer_norm1.weight") || ends_with(name, "layer_norm2.weight") ||
        ends_with(name, "final_layer_norm.weight")) { s = 0.125f; off = 1.0f; }
    else if (ends_with(name, ".bias")) s = 1.0f / 64;
    else if (strstr(name, "embedding")) s = 1.0f / 16;
    for (size_t i = 0; i < n; i++) x[i] = off + x[i] * s;
}

static float *load(const char *name, size_t *n) {
    float *x = NULL;
    size_t k = 0;
    if (st_load_f32(&G, name, &x, &k)) { check(0, "golden %s: %s", name, ms_last_error()); return NULL; }
    if (n) *n = k;
    return x;
}

/* ==========================================================================================
 * Tokenizer
 * ======================================================================================== */
static void test_tokenizer(const char *tokdir) {
    JsonValue *j = NULL;
    if (json_parse_file("tests/data/clip_tokenizer_golden.json", &j)) { check(0, "tokenizer golden: %s", ms_last_error()); return; }
    const JsonValue *sets = json_get(j, "added_sets"), *aids = json_get(j, "added_ids"), *cases = json_get(j, "cases");
    int ok = 1;
    for (int s = 0; s < 3; s++) {
        if (ms_clip_tokenizer_load(tokdir, &TK[s])) { check(0, "load %s: %s", tokdir, ms_last_error()); ok = 0; break; }
        const JsonValue *set = json_at(sets, (size_t)s), *ids = json_at(aids, (size_t)s);
        for (size_t i = 0; i < json_len(set); i++) {
            const char *one = json_at(set, i)->str;
            if (clip_tokenizer_add_tokens(&TK[s], &one, 1, NULL)) { check(0, "add %s: %s", one, ms_last_error()); ok = 0; }
        }
        int same = 1;
        for (size_t i = 0; i < json_len(set); i++) {
            const JsonValue *tv = json_at(set, i);
            same &= clip_tokenizer_find(&TK[s], tv->str, tv->len) == (int)json_at(ids, i)->number;
        }
        check(same, "added-token set %d: ids of all %zu tokens equal HF's (vocab %d + %d added)", s,
              json_len(set), TK[s].n_vocab, TK[s].n_added);
    }
    if (!ok) { json_free(j); return; }
    check(TK[0].n_vocab == 49408 && TK[0].n_merges == 48894 && TK[0].bos_id == 49406 && TK[0].eos_id == 49407 &&
          TK[0].pad_id == 49407, "vocab %d, merges %d, bos %d eos %d pad %d", TK[0].n_vocab, TK[0].n_merges,
          TK[0].bos_id, TK[0].eos_id, TK[0].pad_id);
    int32_t ids[77];
    static const int32_t cat[7] = { 49406, 320, 1125, 539, 320, 2368, 49407 };
    clip_tokenize(&TK[0], "a photo of a cat", 16, ids, 77);
    check(!memcmp(ids, cat, sizeof cat) && ids[7] == 49407 && ids[76] == 49407, "'a photo of a cat' -> 49406 320 1125 539 320 2368 49407 + pad");
    size_t n = json_len(cases), bad = 0, tokens = 0;
    for (size_t i = 0; i < n; i++) {
        const JsonValue *c = json_at(cases, i);
        int s = (int)json_get_int(c, "set", -1);
        const JsonValue *pv = json_get(c, "prompt");
        const char *want = json_get_string(c, "ids", "");
        int32_t w[77];
        int k = 0;
        for (const char *p = want; *p && k < 77; k++) { char *e; w[k] = (int32_t)strtol(p, &e, 10); p = e; }
        MsStatus st = s < 0 || s > 2 || !pv ? MS_ERR_ARG : clip_tokenize(&TK[s], pv->str, pv->len, ids, 77);
        for (int q = 0; q < 77 && !st; q++) tokens += w[q] != TK[s].pad_id || q == 0;
        if (st || k != 77 || memcmp(ids, w, sizeof w)) {
            if (bad++ < 8) {
                printf("      case %zu (set %d) %s\n      prompt: %.200s\n      got :", i, s, st ? ms_last_error() : "", pv ? pv->str : "");
                for (int q = 0; q < 30; q++) printf(" %d", (int)ids[q]);
                printf("\n      want:");
                for (int q = 0; q < 30; q++) printf(" %d", (int)w[q]);
                printf("\n");
            }
        }
    }
    check(bad == 0 && n >= 300, "tokenizer: %zu of %zu golden prompts give HF's 77 ids (%zu non-pad ids)", n - bad, n, tokens);
    /* raw ids and errors */
    size_t nr = 0;
    int32_t raw[8];
    MsStatus rs = clip_tokenize_raw(&TK[1], "<new3> cat", 10, raw, 8, &nr);
    check(rs == MS_OK && nr == 2 && raw[0] == 49408 + 3 && raw[1] == 2368, "raw ids of '<new3> cat' = %d %d (%zu ids)",
          (int)raw[0], (int)raw[1], nr);
    check(clip_tokenize(&TK[0], "a\xff", 2, ids, 77) == MS_ERR_ARG, "invalid UTF-8 -> %s", ms_last_error());
    check(clip_tokenize(&TK[0], "\xed\xa0\x80", 3, ids, 77) == MS_ERR_ARG, "UTF-8 surrogate -> %s", ms_last_error());
    check(clip_tokenize(&TK[0], "\xc0\xaf", 2, ids, 77) == MS_ERR_ARG, "overlong UTF-8 -> %s", ms_last_error());
    /* a bad merges file is refused with a message */
    {
        const char *tok[3] = { "a", "b", "ab" };
        size_t lens[3] = { 1, 1, 2 };
        int64_t id3[3] = { 0, 1, 1 };
        ClipTokenizer t;
        check(clip_tokenizer_init(&t, tok, lens, id3, 3, "#v\na b\n", 7, NULL, "bad") == MS_ERR_FORMAT,
              "repeated vocab id -> %s", ms_last_error());
        int64_t id3b[3] = { 0, 1, 2 };
        check(clip_tokenizer_init(&t, tok, lens, id3b, 3, "#v\na b\n", 7, NULL, "bad") == MS_ERR_FORMAT,
              "vocab without byte symbols -> %s", ms_last_error());
    }
    json_free(j);
}

/* ==========================================================================================
 * Text encoder
 * ======================================================================================== */
typedef struct {
    const ClipTextConfig *c;
    const ClipTextParams *p;
    ClipTextActs *a;
    ClipLora *lora;
    const int32_t *ids;
    float *new_emb;
    int n_new;
    const float *R;
} EncCase;

static double enc_loss(void *ctx) {
    EncCase *e = (EncCase *)ctx;
    if (clip_text_forward(e->a, e->p, e->lora, e->ids, e->new_emb, e->n_new, e->c)) return NAN;
    double l = 0.0;
    size_t n = (size_t)e->a->B * e->a->T * e->c->hidden_size;
    for (size_t i = 0; i < n; i++) l += (double)e->R[i] * e->a->out[i];
    return l;
}

/* Forward + backward of golden case `pre` ("tiny." / "big.") against the file. */
static void golden_case(const char *pre, const ClipTextConfig *c, const ClipTextParams *p, Arena *ar, int rank,
                        float alpha, int B) {
    char k[256];
    size_t n;
    const int D = c->hidden_size, T = 77;
    snprintf(k, sizeof k, "%sids", pre);
    float *idf = load(k, &n);
    snprintf(k, sizeof k, "%snew_emb", pre);
    size_t nn;
    float *new_emb = load(k, &nn);
    snprintf(k, sizeof k, "%sout", pre);
    float *want = load(k, NULL);
    if (!idf || !new_emb || !want || n != (size_t)B * T) return;
    int n_new = (int)(nn / (size_t)D);
    int32_t *ids = (int32_t *)malloc(n * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (int32_t)idf[i];
    /* LoRA weights and gradients */
    size_t ln = clip_lora_numel(c, rank);
    float *lw = test_zeros(ln), *lg = test_zeros(ln), *lwant = test_zeros(ln);
    ClipLora L, dL, wL;
    clip_lora_bind(&L, lw, c, rank, alpha);
    clip_lora_bind(&dL, lg, c, rank, alpha);
    clip_lora_bind(&wL, lwant, c, rank, alpha);
    static const char *const proj[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
    for (int l = 0; l < c->num_hidden_layers; l++)
        for (int j = 0; j < 4; j++) {
            const char *what[2] = { "lora_down", "lora_up" };
            float *dst[2] = { L.down[l][j], L.up[l][j] }, *dw[2] = { wL.down[l][j], wL.up[l][j] };
            for (int q = 0; q < 2; q++) {
                snprintf(k, sizeof k, "%slora.text_model.encoder.layers.%d.self_attn.%s.%s.weight", pre, l, proj[j], what[q]);
                if (st_read_f32(&G, k, dst[q], (size_t)rank * D, -1, NULL)) { check(0, "%s", ms_last_error()); return; }
                snprintf(k, sizeof k, "%sd_lora.text_model.encoder.layers.%d.self_attn.%s.%s.weight", pre, l, proj[j], what[q]);
                if (st_read_f32(&G, k, dw[q], (size_t)rank * D, -1, NULL)) { check(0, "%s", ms_last_error()); return; }
            }
        }
    size_t mark = arena_mark(ar);
    ClipTextActs a;
    if (clip_text_acts_alloc(&a, ar, c, B, T, rank, 1)) { check(0, "acts: %s", ms_last_error()); return; }
    MsStatus s = clip_text_forward(&a, p, &L, ids, new_emb, n_new, c);
    check(!s, "%sforward: %s", pre, s ? ms_last_error() : "ok");
    snprintf(k, sizeof k, "%slast_hidden_state (B=%d, LoRA r=%d)", pre, B, rank);
    check_close(k, a.out, want, (size_t)B * T * D, 1e-5, 0);
    /* backward of L = sum(R * out) */
    float *R = test_zeros((size_t)B * T * D), *dnew = test_zeros(nn);
    snprintf(k, sizeof k, "%s%sR", pre, pre);
    gen_value(k, R, (size_t)B * T * D);
    clip_text_backward(&dL, dnew, R, &a, p, &L, ids, n_new, c);
    snprintf(k, sizeof k, "%sd_new_emb", pre);
    float *dwant = load(k, NULL);
    snprintf(k, sizeof k, "%sd new embedding rows (%d x %d)", pre, n_new, D);
    if (dwant) check_close(k, dnew, dwant, nn, 1e-4, 0);
    snprintf(k, sizeof k, "%sd LoRA down/up (all layers)", pre);
    check_close(k, lg, lwant, ln, 1e-4, 0);
    /* per-tensor check so a bad layer stands out */
    int all = 1;
    for (int l = 0; l < c->num_hidden_layers; l++)
        for (int j = 0; j < 4; j++) {
            TestErr e1 = test_err_f(dL.down[l][j], wL.down[l][j], (size_t)rank * D);
            TestErr e2 = test_err_f(dL.up[l][j], wL.up[l][j], (size_t)rank * D);
            if (!(e1.rel_l2 <= 1e-4 && e2.rel_l2 <= 1e-4)) {
                all = 0;
                printf("      layer %d %s: down %.3e up %.3e\n", l, proj[j], e1.rel_l2, e2.rel_l2);
            }
        }
    check(all, "%severy LoRA gradient tensor within 1e-4", pre);
    /* CLIP_TRAIN_RECOMPUTE (each layer recomputed from its input in backward) gives the very
     * same output and gradients, bit for bit, in a smaller arena */
    {
        ClipTextActs ar2;
        float *lg2 = test_zeros(ln), *dnew2 = test_zeros(nn);
        ClipLora dL2;
        clip_lora_bind(&dL2, lg2, c, rank, alpha);
        size_t keep = clip_text_sizes(c, B, T, rank, CLIP_TRAIN_KEEP), rec = clip_text_sizes(c, B, T, rank, CLIP_TRAIN_RECOMPUTE);
        check(c->num_hidden_layers < 2 || rec < keep, "%srecompute plans less: %zu < %zu bytes", pre, rec, keep);
        if (!clip_text_acts_alloc(&ar2, ar, c, B, T, rank, CLIP_TRAIN_RECOMPUTE) &&
            !clip_text_forward(&ar2, p, &L, ids, new_emb, n_new, c)) {
            snprintf(k, sizeof k, "%srecompute: forward == keep", pre);
            check_bitwise(k, ar2.out, a.out, (size_t)B * T * D);
            clip_text_backward(&dL2, dnew2, R, &ar2, p, &L, ids, n_new, c);
            snprintf(k, sizeof k, "%srecompute: d LoRA == keep (bitwise)", pre);
            check_bitwise(k, lg2, lg, ln);
            snprintf(k, sizeof k, "%srecompute: d new embedding rows == keep (bitwise)", pre);
            check_bitwise(k, dnew2, dnew, nn);
        } else check(0, "%srecompute forward: %s", pre, ms_last_error());
        ms_free_aligned(lg2); ms_free_aligned(dnew2);
    }
    /* inference mode gives the same numbers (bitwise: same ops in the same order) */
    ClipTextActs ai;
    if (!clip_text_acts_alloc(&ai, ar, c, B, T, rank, 0) && !clip_text_forward(&ai, p, &L, ids, new_emb, n_new, c))
        check_bitwise("inference == training forward", ai.out, a.out, (size_t)B * T * D);
    else check(0, "inference forward: %s", ms_last_error());
    arena_reset(ar, mark);
    ms_free_aligned(lw); ms_free_aligned(lg); ms_free_aligned(lwant); ms_free_aligned(R); ms_free_aligned(dnew);
    ms_free_aligned(idf); ms_free_aligned(new_emb); ms_free_aligned(want); ms_free_aligned(dwant);
    free(ids);
}

static void test_tiny(const char *dir, Arena *ar) {
    MsModel m;
    if (ms_model_load(dir, NULL, &m)) { check(0, "load %s: %s", dir, ms_last_error()); return; }
    const ClipTextConfig *c = &m.text_config;
    ClipTextParams p;
    if (clip_text_params(&p, &m.text, c)) { check(0, "params: %s", ms_last_error()); ms_model_free(&m); return; }
    golden_case("tiny.", c, &p, ar, 4, 0.75f, 4);
    /* plain model, inference mode */
    size_t n;
    float *idf = load("tiny_plain.ids", &n), *want = load("tiny_plain.out", NULL);
    if (idf && want) {
        int B = (int)(n / 77);
        int32_t *ids = (int32_t *)malloc(n * sizeof *ids);
        for (size_t i = 0; i < n; i++) ids[i] = (int32_t)idf[i];
        size_t mark = arena_mark(ar);
        ClipTextActs a;
        if (!clip_text_acts_alloc(&a, ar, c, B, 77, 0, 0) && !clip_text_forward(&a, &p, NULL, ids, NULL, 0, c))
            check_close("tiny plain last_hidden_state (inference)", a.out, want, n * c->hidden_size, 1e-5, 0);
        else check(0, "plain forward: %s", ms_last_error());
        /* an id past the table without new rows is an error, not a crash */
        ids[3] = 49408;
        check(clip_text_forward(&a, &p, NULL, ids, NULL, 0, c) == MS_ERR_ARG, "id 49408 without new rows -> %s", ms_last_error());
        arena_reset(ar, mark);
        free(ids);
    }
    ms_free_aligned(idf); ms_free_aligned(want);

    /* gradchecks: B=2, T=12, the tiny weights, rank 3, 2 new rows */
    {
        const int B = 2, T = 12, r = 3, n_new = 2, D = c->hidden_size;
        int32_t ids[24];
        for (int i = 0; i < B * T; i++) ids[i] = (int32_t)((i * 7919) % 49408);
        ids[3] = 49408; ids[5] = 49409; ids[T + 1] = 49409; ids[T + 8] = 49408;
        MsRng rng;
        ms_rng_seed(&rng, 11);
        float *new_emb = test_randn(&rng, (size_t)n_new * D, 0.5f), *R = test_randn(&rng, (size_t)B * T * D, 1.0f);
        size_t ln = clip_lora_numel(c, r);
        float *lw = test_randn(&rng, ln, 0.3f), *lg = test_zeros(ln), *dnew = test_zeros((size_t)n_new * D);
        ClipLora L, dL;
        clip_lora_bind(&L, lw, c, r, 0.8f);
        clip_lora_bind(&dL, lg, c, r, 0.8f);
        size_t mark = arena_mark(ar);
        ClipTextActs a;
        if (clip_text_acts_alloc(&a, ar, c, B, T, r, 1)) { check(0, "acts: %s", ms_last_error()); return; }
        EncCase e = { c, &p, &a, &L, ids, new_emb, n_new, R };
        enc_loss(&e);
        clip_text_backward(&dL, dnew, R, &a, &p, &L, ids, n_new, c);
        double w1 = gradcheck_top(enc_loss, &e, new_emb, dnew, (size_t)n_new * D, 1e-2f, test_is_verbose());
        check(w1 < 1e-2, "gradcheck d new embedding rows: worst rel err %.2e", w1);
        double w2 = gradcheck_top(enc_loss, &e, lw, lg, ln, 1e-2f, test_is_verbose());
        check(w2 < 1e-2, "gradcheck d LoRA down/up (%zu values): worst rel err %.2e", ln, w2);
        double gs = 0;
        for (size_t i = 0; i < ln; i++) gs += fabs(lg[i]);
        check(gs > 0, "LoRA gradients are not all zero (sum |g| = %.3e)", gs);
        arena_reset(ar, mark);
        ms_free_aligned(new_emb); ms_free_aligned(R); ms_free_aligned(lw); ms_free_aligned(lg); ms_free_aligned(dnew);
    }
    ms_model_free(&m);
}

static void test_big(Arena *ar) {
    ClipTextConfig c;
    ms_clip_text_config_sd15(&c);
    c.vocab_size = 1000; c.num_hidden_layers = 2;
    MsParamTable t;
    if (ms_param_table_text(&c, &t) || ms_param_table_alloc(&t, NULL)) { check(0, "table: %s", ms_last_error()); return; }
    char k[256];
    for (int i = 0; i < t.n; i++) {
        if (t.p[i].flags & MS_PARAM_BUFFER) continue;
        snprintf(k, sizeof k, "big.%s", t.p[i].name);
        gen_value(k, t.p[i].f32, t.p[i].numel);
    }
    ClipTextParams p;
    if (clip_text_params(&p, &t, &c)) check(0, "params: %s", ms_last_error());
    else golden_case("big.", &c, &p, ar, 4, 1.0f, 2);
    ms_param_table_free(&t);
}

int main(void) {
    char dir[1024], tokdir[1100];
    double t0 = ms_time();
    snprintf(dir, sizeof dir, "%s", test_tiny_dir());
    snprintf(tokdir, sizeof tokdir, "%s/tokenizer", dir);
    test_tokenizer(tokdir);
    double t1 = ms_time();
    if (st_open(&G, "tests/data/clip_golden.safetensors")) { check(0, "golden: %s", ms_last_error()); return test_summary("test_clip"); }
    Arena ar;
    ClipTextConfig sd;
    ms_clip_text_config_sd15(&sd);
    sd.num_hidden_layers = 2;
    if (arena_init(&ar, 2 * clip_text_sizes(&sd, 2, 77, 4, 1) + ((size_t)16 << 20))) { check(0, "arena"); return 1; }
    test_tiny(dir, &ar);
    test_big(&ar);
    {   /* the plan at SD 1.5 shapes: 16 prompts x 77 (an ED-LoRA step at batch 1), rank 4 */
        ClipTextConfig c15;
        ms_clip_text_config_sd15(&c15);
        size_t keep = clip_text_sizes(&c15, 16, 77, 4, CLIP_TRAIN_KEEP);
        size_t rec = clip_text_sizes(&c15, 16, 77, 4, CLIP_TRAIN_RECOMPUTE);
        size_t inf = clip_text_sizes(&c15, 16, 77, 0, CLIP_INFER);
        printf("  SD 1.5 text acts at 16x77, rank 4: keep %.1f MiB, recompute %.1f MiB (inference %.1f MiB)\n",
               keep / 1048576.0, rec / 1048576.0, inf / 1048576.0);
        check(rec < keep / 3, "SD 1.5: recompute plans under a third of keep (%zu vs %zu bytes)", rec, keep);
        ClipTextActs bad;
        check(clip_text_acts_alloc(&bad, &ar, &c15, 1, 77, 0, 3) == MS_ERR_ARG, "mode 3 -> MS_ERR_ARG: %s", ms_last_error());
    }
    printf("  time: tokenizer %.2f s, encoder %.2f s\n", t1 - t0, ms_time() - t1);
    arena_free(&ar);
    st_close(&G);
    for (int s = 0; s < 3; s++) clip_tokenizer_free(&TK[s]);
    ops_scratch_free();
    ms_gemm_scratch_free();
    return test_summary("test_clip");
}
