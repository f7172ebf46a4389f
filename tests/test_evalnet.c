/* tests/test_evalnet.c — the alignment stand-ins of `mixshow eval` (models/evalnet.c,
 * tools/eval_world.c, tools/cmd_eval.c; issue 15):
 *   - central-difference gradient checks of the new backwards: L2 normalisation, the CLIP loss
 *     (both embeddings and the logit scale), the supervised contrastive loss, the whole image
 *     trunk with both heads (every tensor), and the whole training step (lr 0: nothing moves)
 *     through the text tower's pooling and projection into the CLIP text encoder;
 *   - a short training on world batches whose loss falls; 1 vs 2 threads bitwise; a checkpoint
 *     resumed == the straight run, bitwise;
 *   - after a short training, true captions score higher than other captions on held-out scenes,
 *     and `mixshow eval` writes per-image and mean scores where matched prompts beat shuffled
 *     ones and a creature's own references beat another creature's. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* mkdir */
#endif
#include "tests/test.h"
#include "tools/tools.h"

#if defined(_WIN32)
#include <direct.h>
#define mkdir(p, m) _mkdir(p)
#else
#include <sys/stat.h>
#endif

static MsRng rng;

/* A small config: 16x16 images, 3 levels, 1 stride-1 unit per level, CLIP text 16 wide. */
static void tiny_config(EvalNetConfig *c, int size) {
    evalnet_config_default(c);
    c->size = size; c->n_levels = 3;
    c->channels[0] = 4; c->channels[1] = 8; c->channels[2] = 8;
    c->layers = 1; c->groups = 2; c->text_pool = 2; c->embed_dim = 5; c->id_dim = 3;
    c->text.hidden_size = 16; c->text.intermediate_size = 32; c->text.num_hidden_layers = 1;
    c->text.num_attention_heads = 2; c->text.max_position_embeddings = 16;
}

/* ---- op-level checks: L = sum r * f(x) or the loss itself ---- */
typedef struct {
    int N, D, B;
    float *x, *y, *norm, *r, *u, *v, ls;
    int *labels;
    double *work;
    int which;           /* 0 l2norm, 1 clip, 2 supcon */
} OpCase;

static double op_loss(void *p) {
    OpCase *c = (OpCase *)p;
    if (c->which == 0) {
        double s = 0.0;
        l2norm_forward(c->y, c->norm, c->x, c->N, c->D);
        for (int i = 0; i < c->N * c->D; i++) s += (double)c->r[i] * c->y[i];
        return s;
    }
    if (c->which == 1) return clip_loss_forward(c->u, c->v, c->ls, c->B, c->D, NULL, c->work);
    return supcon_loss_forward(c->u, c->labels, 0.1f, c->B, c->D, c->work);
}

static void test_ops(void) {
    OpCase c;
    memset(&c, 0, sizeof c);
    c.N = 5; c.D = 7; c.B = 6;
    c.x = test_track(test_randn(&rng, 35, 1.0f)); c.y = test_track(test_zeros(35)); c.norm = test_track(test_zeros(5));
    c.r = test_track(test_randn(&rng, 35, 1.0f));
    float *dx = test_track(test_zeros(35));
    op_loss(&c);
    l2norm_backward(dx, c.r, c.y, c.norm, c.N, c.D);
    check(gradcheck(op_loss, &c, c.x, dx, 35, 1e-2f) <= 1e-2, "gradcheck l2norm dx");

    /* CLIP loss on unit rows (as used) and a logit scale of 2 */
    int labels[6] = { 0, 1, 0, 2, 1, 3 };      /* label 3: an anchor without positives */
    c.which = 1;
    c.work = (double *)malloc(3 * 36 * sizeof(double));
    c.u = test_track(test_zeros(42)); c.v = test_track(test_zeros(42));
    float *tmp = test_track(test_randn(&rng, 42, 1.0f)), *nn = test_track(test_zeros(6));
    l2norm_forward(c.u, nn, tmp, 6, 7);
    tmp = test_track(test_randn(&rng, 42, 1.0f));
    l2norm_forward(c.v, nn, tmp, 6, 7);
    c.ls = 2.0f;
    float *du = test_track(test_zeros(42)), *dv = test_track(test_zeros(42)), dls = 0.0f;
    clip_loss_backward(du, dv, &dls, c.u, c.v, c.ls, 6, 7, 1.0f, c.work);
    check(gradcheck(op_loss, &c, c.u, du, 42, 1e-3f) <= 1e-2, "gradcheck clip loss du");
    check(gradcheck(op_loss, &c, c.v, dv, 42, 1e-3f) <= 1e-2, "gradcheck clip loss dv");
    check(gradcheck(op_loss, &c, &c.ls, &dls, 1, 1e-3f) <= 1e-2, "gradcheck clip loss dlogit_scale (%.4f)", (double)dls);
    {   /* a diagonal-dominant pair scores its rows as hits */
        int hits = -1;
        clip_loss_forward(c.u, c.u, 4.0f, 6, 7, &hits, c.work);
        check(hits == 6, "clip loss: u against itself, %d of 6 rows top-1", hits);
    }
    c.which = 2;
    c.labels = labels;
    memset(du, 0, 42 * sizeof(float));
    supcon_loss_backward(du, c.u, labels, 0.1f, 6, 7, 1.0f, c.work);
    check(gradcheck(op_loss, &c, c.u, du, 42, 1e-3f) <= 1e-2, "gradcheck supcon loss dz");
    free(c.work);
}

/* ---- the image trunk: every tensor ---- */
typedef struct {
    EvalNetConfig c;
    EvalNet e;
    EvalImageActs a;
    float *img, *rt, *ri;
} TrunkCase;

static double trunk_loss(void *p) {
    TrunkCase *t = (TrunkCase *)p;
    double s = 0.0;
    evalnet_image_forward(&t->a, &t->e.p, t->img, &t->c);
    for (int i = 0; i < t->a.N * t->c.embed_dim; i++) s += (double)t->rt[i] * t->a.temb[i];
    for (int i = 0; i < t->a.N * t->c.id_dim; i++) s += (double)t->ri[i] * t->a.iemb[i];
    return s;
}

static void test_trunk(void) {
    TrunkCase t;
    Arena ar;
    MsParamTable g;
    EvalNetParams dp;
    const int N = 3;
    tiny_config(&t.c, 16);
    check(evalnet_create(&t.e, &t.c) == MS_OK, "evalnet_create (tiny) %s", ms_last_error());
    for (int i = 0; i < t.e.net.n; i++) {          /* random weights; norms near 1 */
        MsParam *q = &t.e.net.p[i];
        ms_rng_fill_normal(&rng, q->f32, q->numel, strstr(q->name, "norm.weight") ? 1.0f : 0.0f, 0.3f);
    }
    check(arena_init(&ar, evalnet_image_sizes(&t.c, N)) == MS_OK && evalnet_image_acts_alloc(&t.a, &ar, &t.c, N) == MS_OK,
          "image acts planned and allocated");
    check(t.a.n_units == 5 && t.a.n_pool == 1 && t.a.id_pool == 2, "units %d (5), text pool step %d (1), id pool %d (2)",
          t.a.n_units, t.a.n_pool, t.a.id_pool);
    t.img = test_track(test_randn(&rng, (size_t)N * 3 * 16 * 16, 1.0f));
    t.rt = test_track(test_randn(&rng, (size_t)N * 5, 1.0f));
    t.ri = test_track(test_randn(&rng, (size_t)N * 3, 1.0f));
    ms_param_table_evalnet(&t.c, &g);
    ms_param_table_alloc(&g, NULL);
    memset(g.mem, 0, g.mem_bytes);
    evalnet_params_bind(&dp, &g, &t.c);
    trunk_loss(&t);
    evalnet_image_backward(&dp, t.rt, t.ri, &t.a, &t.e.p, t.img, &t.c);
    double worst = 0.0;
    const char *wn = "";
    int checked = 0;
    for (int i = 0; i < g.n; i++) {
        const MsParam *q = &g.p[i];
        if (!strcmp(q->name, "text_projection.weight") || !strcmp(q->name, "logit_scale")) continue;   /* not in the trunk */
        double w = gradcheck_top(trunk_loss, &t, t.e.net.p[i].f32, q->f32, q->numel, 1e-2f, 0);
        checked++;
        if (w > worst) { worst = w; wn = q->name; }
    }
    check(worst <= 2e-2, "gradcheck image trunk: %d tensors, worst rel err %.2e (%s)", checked, worst, wn);
    ms_param_table_free(&g);
    arena_free(&ar);
    evalnet_free(&t.e);
}

/* ---- the whole step, lr 0 (the loss is the forward's; nothing moves) ---- */
typedef struct {
    EvalTrainer *t;
    const float *img;
    const char *const *caps;
    const int *labels;
} StepCase;

static double step_loss(void *p) {
    StepCase *s = (StepCase *)p;
    EvalStepReport rep;
    evalnet_train_step(s->t, s->img, s->caps, s->labels, &rep);
    return rep.loss;
}

static int load_tokenizer(ClipTokenizer *tok) {
    char dir[2048];
    int shipped;
    return ms_find_tokenizer(NULL, NULL, dir, sizeof dir, &shipped) == MS_OK && ms_clip_tokenizer_load(dir, tok) == MS_OK;
}

static void init_weights(EvalNet *e, uint64_t seed) {
    MsTorchRng g;
    ms_torch_seed(&g, seed);
    ms_pretrain_init_weights(&e->net, &g);
    ms_pretrain_init_weights(&e->text, &g);
    e->p.logit_scale[0] = (float)log(1.0 / 0.07);
}

static void test_step_grad(const ClipTokenizer *tok) {
    EvalNetConfig c;
    EvalNet e;
    EvalTrainer *t = NULL;
    EvalTrainConfig tc;
    EvalData d = { 11, 64, 6, 4, 2, 3, 0 };
    char (*caps)[EVAL_CAPTION] = (char (*)[EVAL_CAPTION])malloc(6 * EVAL_CAPTION);
    const char *cp[6];
    int labels[4];
    MsParamTable *gn, *gt;
    tiny_config(&c, 16);
    evalnet_create(&e, &c);
    init_weights(&e, 1);
    evalnet_train_config_default(&tc);
    tc.lr = 0.0;
    tc.weight_decay = 0.0;
    check(evalnet_trainer_create(&t, &e, tok, &tc, 6, 4) == MS_OK, "trainer (6 captioned + 4 identity) %s", ms_last_error());
    float *img = test_track(test_zeros((size_t)10 * 3 * 16 * 16));
    check(eval_world_batch(&d, 16, 1, img, caps, labels) == MS_OK, "world batch: '%s', labels %d %d %d %d", caps[0],
          labels[0], labels[1], labels[2], labels[3]);
    for (int b = 0; b < 6; b++) cp[b] = caps[b];
    StepCase sc = { t, img, cp, labels };
    step_loss(&sc);
    evalnet_trainer_grads(t, &gn, &gt);
    /* copies: every finite-difference evaluation overwrites the trainer's gradients */
    static const char *const names[] = { "logit_scale", "text_projection.weight", "image.text_proj.weight",
                                         "image.id_proj.weight", "image.down.0.0.conv.weight" };
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        int i = ms_param_find(gn, names[k]);
        float *g = test_track(test_zeros(gn->p[i].numel));
        step_loss(&sc);
        memcpy(g, gn->p[i].f32, gn->p[i].numel * sizeof(float));
        double w = gradcheck_top(step_loss, &sc, e.net.p[i].f32, g, gn->p[i].numel, 1e-2f, 0);
        check(w <= 2e-2, "gradcheck train step d%-28s worst rel err %.2e", names[k], w);
    }
    static const char *const tnames[] = { "text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight",
                                          "text_model.embeddings.position_embedding.weight" };
    for (size_t k = 0; k < sizeof tnames / sizeof tnames[0]; k++) {
        int i = ms_param_find(gt, tnames[k]);
        float *g = test_track(test_zeros(gt->p[i].numel));
        step_loss(&sc);
        memcpy(g, gt->p[i].f32, gt->p[i].numel * sizeof(float));
        double w = gradcheck_top(step_loss, &sc, e.text.p[i].f32, g, gt->p[i].numel, 1e-2f, 0);
        check(w <= 2e-2, "gradcheck train step d%-28s worst rel err %.2e", tnames[k], w);
    }
    evalnet_trainer_free(t);
    evalnet_free(&e);
    free(caps);
}

/* ---- training runs ---- */
typedef struct { EvalNet e; EvalTrainer *t; double loss[200]; } Run;

static void run_steps(Run *r, const ClipTokenizer *tok, const EvalNetConfig *c, const EvalData *d, int from, int to,
                      int fresh) {
    EvalTrainConfig tc;
    const int N = d->Bt + d->Bi;
    float *img = (float *)ms_alloc_aligned((size_t)N * 3 * c->size * c->size, sizeof(float));
    char (*caps)[EVAL_CAPTION] = (char (*)[EVAL_CAPTION])malloc((size_t)d->Bt * EVAL_CAPTION);
    const char **cp = (const char **)malloc((size_t)d->Bt * sizeof(char *));
    int *labels = (int *)malloc((size_t)d->Bi * sizeof(int));
    for (int b = 0; b < d->Bt; b++) cp[b] = caps[b];
    if (fresh) {
        evalnet_create(&r->e, c);
        init_weights(&r->e, 5);
        evalnet_train_config_default(&tc);
        tc.warmup = 10;
        tc.lr = getenv("LR") ? atof(getenv("LR")) : 5e-3;
        evalnet_trainer_create(&r->t, &r->e, tok, &tc, d->Bt, d->Bi);
    }
    for (int k = from; k <= to; k++) {
        EvalStepReport rep;
        eval_world_batch(d, c->size, k, img, caps, labels);
        if (evalnet_train_step(r->t, img, cp, labels, &rep) != MS_OK) { check(0, "step %d: %s", k, ms_last_error()); break; }
        r->loss[k - 1] = rep.loss;
    }
    ms_free_aligned(img); free(caps); free(cp); free(labels);
}

static void run_free(Run *r) { evalnet_trainer_free(r->t); evalnet_free(&r->e); }

static int same_bits(const MsParamTable *a, const MsParamTable *b) {
    return a->mem_bytes == b->mem_bytes && !memcmp(a->mem, b->mem, a->mem_bytes);
}

static void test_training(const ClipTokenizer *tok) {
    EvalNetConfig c;
    EvalData d = { 7, 512, 16, 8, 2, 4, 0 };
    Run a, b;
    char path[256];
    tiny_config(&c, 32);
    c.channels[0] = 8; c.channels[1] = 16; c.channels[2] = 32; c.groups = 4; c.embed_dim = 16; c.id_dim = 16;
    /* 1 vs 2 threads, 3 steps */
    ms_set_parallel_min_work(0);
    ms_set_threads(1);
    run_steps(&a, tok, &c, &d, 1, 3, 1);
    ms_set_threads(2);
    run_steps(&b, tok, &c, &d, 1, 3, 1);
    ms_set_threads(1);
    ms_set_parallel_min_work(-1);
    check(same_bits(&a.e.net, &b.e.net) && same_bits(&a.e.text, &b.e.text) && a.loss[2] == b.loss[2],
          "3 steps: 1 vs 2 threads bit-identical weights and losses");
    run_free(&b);
    /* checkpoint at 3, resumed in a fresh run, 2 more steps == straight 5 */
    snprintf(path, sizeof path, "/tmp/ms_test_evalnet_%ld.safetensors", test_pid());
    const char *meta[2] = { "recipe", "test" };
    check(evalnet_save(path, &a.e, a.t, meta, 1) == MS_OK, "checkpoint written %s", ms_last_error());
    run_steps(&a, tok, &c, &d, 4, 5, 0);
    {
        Run r;
        EvalTrainConfig tc;
        memset(&r, 0, sizeof r);
        evalnet_create(&r.e, &c);
        evalnet_train_config_default(&tc);
        tc.warmup = 10;
        tc.lr = getenv("LR") ? atof(getenv("LR")) : 5e-3;
        evalnet_trainer_create(&r.t, &r.e, tok, &tc, d.Bt, d.Bi);
        check(evalnet_load(path, &r.e, r.t, "other") != MS_OK, "resume refuses another recipe");
        check(evalnet_load(path, &r.e, r.t, "test") == MS_OK && evalnet_trainer_step_count(r.t) == 3, "resumed at step 3 %s",
              ms_last_error());
        run_steps(&r, tok, &c, &d, 4, 5, 0);
        check(same_bits(&a.e.net, &r.e.net) && same_bits(&a.e.text, &r.e.text) && a.loss[4] == r.loss[4],
              "3 steps + resume + 2 == 5 straight, bitwise");
        run_free(&r);
    }
    {   /* the encoders file alone: config and weights come back */
        EvalNet l;
        check(evalnet_save(path, &a.e, NULL, NULL, 0) == MS_OK && evalnet_load(path, &l, NULL, NULL) == MS_OK &&
              same_bits(&l.net, &a.e.net) && same_bits(&l.text, &a.e.text) && l.cfg.channels[2] == 32,
              "encoders file round trip %s", ms_last_error());
        evalnet_free(&l);
    }
    remove(path);
    /* a short training: the loss falls */
    run_steps(&a, tok, &c, &d, 6, 60, 0);
    double first = 0.0, last = 0.0;
    for (int k = 0; k < 10; k++) { first += a.loss[k] / 10; last += a.loss[50 + k] / 10; }
    check(last < first - 0.3, "60 steps: mean loss of steps 1-10 %.3f -> 51-60 %.3f", first, last);
    run_free(&a);
}

/* token_max_norm: the constraint alone (rows above X scaled to X, to the float; rows at or below
 * untouched, bitwise), and `eval --train-encoders --token-max-norm 0.05` (the tiny tower's rows
 * start at 0.02 sqrt(16) = 0.08 on average): every row of the checkpoint's table within it, most at
 * it, and the recipe says so. */
static void test_token_max_norm(void) {
    enum { V = 6, D = 5 };
    float t[V * D], t0[V * D];
    for (int i = 0; i < V * D; i++) t[i] = t0[i] = (float)((i * 7 % 11) - 5) * (i / D % 2 ? 0.5f : 0.01f);
    evalnet_token_max_norm(t, V, D, 0.3);
    int ok = 1;
    for (int r = 0; r < V; r++) {
        double n0 = 0.0, n1 = 0.0;
        for (int d = 0; d < D; d++) { n0 += (double)t0[r * D + d] * t0[r * D + d]; n1 += (double)t[r * D + d] * t[r * D + d]; }
        n0 = sqrt(n0); n1 = sqrt(n1);
        if (n0 > 0.3) ok &= fabs(n1 - 0.3) <= 1e-6 && fabs(t[r * D] * n0 - t0[r * D] * 0.3) <= 1e-6;   /* same direction */
        else ok &= !memcmp(t + r * D, t0 + r * D, D * sizeof(float));
    }
    check(ok, "token max norm 0.3: long rows scaled to 0.3 along their direction, the others untouched");
    char dir[256], enc[320];
    snprintf(dir, sizeof dir, "/tmp/ms_test_evalnet_tmn_%ld", test_pid());
    char *args[] = { "eval", "--train-encoders", dir, "--steps", "2", "--checkpoint-every", "2", "--batch-text", "4", "--batch-id",
                     "4", "--per-id", "2", "--identities", "8", "--size", "32", "--channels", "8,16,32", "--text-width", "16",
                     "--token-max-norm", "0.05", "--seed", "2", "-q", NULL };
    if (!check(cmd_eval(26, args) == 0, "eval --train-encoders --token-max-norm 0.05: %s", ms_last_error())) return;
    snprintf(enc, sizeof enc, "%s/checkpoint.safetensors", dir);
    StFile f;
    if (check(st_open(&f, enc) == MS_OK, "open %s", enc)) {
        const char *rec = st_meta(&f, "recipe");
        float *x = NULL;
        size_t n = 0;
        check(rec && strstr(rec, "token_max_norm=0.05") != NULL, "the recipe records it: %s", rec ? rec : "(none)");
        if (check(st_load_f32(&f, "text_encoder.text_model.embeddings.token_embedding.weight", &x, &n) == MS_OK && n % 16 == 0,
                  "the checkpoint's token table")) {
            double most = 0.0;
            size_t at = 0, rows = n / 16;
            for (size_t r = 0; r < rows; r++) {
                double q = 0.0;
                for (int d = 0; d < 16; d++) q += (double)x[r * 16 + d] * x[r * 16 + d];
                q = sqrt(q);
                most = fmax(most, q);
                at += fabs(q - 0.05) <= 1e-6;
            }
            check(most <= 0.05 * (1 + 1e-6) && at > rows / 2, "every one of %zu token rows <= 0.05 (longest %.9f; %zu at the "
                  "bound: they start at 0.08 on average)", rows, most, at);
        }
        ms_free_aligned(x);
        st_close(&f);
    }
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) printf("  (could not remove %s)\n", dir);
}

/* `mixshow eval` on encoders trained (in seconds) on 8 scenes and 4 creatures: the true prompts
 * must beat shuffled ones, a creature's own references another creature's. Generalisation to
 * unseen scenes and creatures is what `--train-encoders` measures and prints (README). */
static void png_of(const char *path, const float *img, int S) {
    uint8_t *px = (uint8_t *)malloc((size_t)S * S * 3);
    for (int i = 0; i < S * S; i++)
        for (int ch = 0; ch < 3; ch++) px[3 * i + ch] = (uint8_t)floor(((double)img[(size_t)ch * S * S + i] + 1.0) * 127.5 + 0.5);
    ms_png_write(path, px, S, S, 3);
    free(px);
}

static double json_mean(const char *path, const char *key) {
    JsonValue *j = NULL;
    double v = NAN;
    if (json_parse_file(path, &j) == MS_OK) v = json_get_number(j, key, NAN);
    json_free(j);
    return v;
}

static void test_cli(const ClipTokenizer *tok) {
    EvalNetConfig c;
    EvalData d = { 9, 4, 16, 8, 2, 0, 8 };
    Run a;
    char dir[256], p[512], enc[512], *args[16];
    const int S = 32, N = d.Bt + d.Bi;
    tiny_config(&c, S);
    c.channels[0] = 8; c.channels[1] = 16; c.channels[2] = 32; c.groups = 4; c.embed_dim = 16; c.id_dim = 16;
    run_steps(&a, tok, &c, &d, 1, 150, 1);
    snprintf(dir, sizeof dir, "/tmp/ms_test_evalnet_%ld", test_pid());
    ms_clear_error();
    mkdir(dir, 0777);
    snprintf(enc, sizeof enc, "%s/enc.safetensors", dir);
    check(evalnet_save(enc, &a.e, NULL, NULL, 0) == MS_OK, "encoders written %s", ms_last_error());
    /* one batch of the training distribution: its captioned scenes and its creatures */
    float *img = (float *)ms_alloc_aligned((size_t)N * 3 * S * S, sizeof(float));
    char (*caps)[EVAL_CAPTION] = (char (*)[EVAL_CAPTION])malloc((size_t)d.Bt * EVAL_CAPTION);
    int labels[8];
    eval_world_batch(&d, S, 1000, img, caps, labels);
    FILE *fm, *fs;
    snprintf(p, sizeof p, "%s/prompts.txt", dir);
    fm = fopen(p, "w");
    snprintf(p, sizeof p, "%s/shuffled.txt", dir);
    fs = fopen(p, "w");
    for (int b = 0; b < 8; b++) {
        snprintf(p, sizeof p, "%s/s%d.png", dir, b);
        png_of(p, img + (size_t)b * 3 * S * S, S);
        fprintf(fm, "s%d.png\t%s\n", b, caps[b]);
        fprintf(fs, "s%d.png\t%s\n", b, caps[(b + 3) % 8]);
    }
    fclose(fm); fclose(fs);
    /* labels come in pairs: creature A = labels[0] (renders 0, 1), B = the next other label */
    int ib = 2;
    while (ib < 8 && labels[ib] == labels[0]) ib += 2;
    snprintf(p, sizeof p, "%s/refA", dir); mkdir(p, 0777);
    snprintf(p, sizeof p, "%s/refB", dir); mkdir(p, 0777);
    snprintf(p, sizeof p, "%s/refA/a.png", dir); png_of(p, img + (size_t)(d.Bt + 0) * 3 * S * S, S);
    snprintf(p, sizeof p, "%s/refB/b.png", dir); png_of(p, img + (size_t)(d.Bt + ib) * 3 * S * S, S);
    snprintf(p, sizeof p, "%s/gen", dir); mkdir(p, 0777);
    snprintf(p, sizeof p, "%s/gen/g.png", dir); png_of(p, img + (size_t)(d.Bt + 1) * 3 * S * S, S);
    snprintf(p, sizeof p, "%s/gen/prompts.txt", dir);
    fm = fopen(p, "w");
    fprintf(fm, "# a render of creature A\ng.png\ta creature\tA\ng.png\ta creature\tB\n");
    fclose(fm);
    char img_dir[512], outp[512], sh[512], refa[512], refb[512], gen[512];
    snprintf(img_dir, sizeof img_dir, "%s", dir);
    snprintf(outp, sizeof outp, "%s/m", dir);
    args[0] = "eval"; args[1] = "--images"; args[2] = img_dir; args[3] = "--encoders"; args[4] = enc;
    args[5] = "--out"; args[6] = outp;
    check(cmd_eval(7, args) == 0, "mixshow eval (matched prompts) %s", ms_last_error());
    snprintf(sh, sizeof sh, "%s/shuffled.txt", dir);
    snprintf(outp, sizeof outp, "%s/s", dir);
    args[7] = "--prompts"; args[8] = sh;
    check(cmd_eval(9, args) == 0, "mixshow eval (shuffled prompts)");
    snprintf(p, sizeof p, "%s/m.json", dir);
    const double tm = json_mean(p, "mean_text_alignment");
    snprintf(p, sizeof p, "%s/s.json", dir);
    const double ts = json_mean(p, "mean_text_alignment");
    check(tm > ts + 0.05, "mean text alignment: matched %.4f > shuffled %.4f", tm, ts);
    {   /* caption ranks: recomputed from the encoders on the written PNGs, each image against the 8
         * distinct captions; the shuffled run's prompts are the same 8, so its ranks differ */
        const int E = a.e.cfg.embed_dim;
        float *im8 = (float *)ms_alloc_aligned((size_t)8 * 3 * S * S, sizeof(float)), *u = (float *)malloc(8 * E * sizeof(float));
        float *z = (float *)malloc(8 * (size_t)a.e.cfg.id_dim * sizeof(float)), *v = (float *)malloc(8 * E * sizeof(float));
        const char *cp[8];
        int ok = 1, rk[8], top_m = 0, top_s = 0;
        for (int b = 0; b < 8; b++) {
            snprintf(p, sizeof p, "%s/s%d.png", dir, b);
            ok &= eval_image_load(p, S, im8 + (size_t)b * 3 * S * S) == MS_OK;
            cp[b] = caps[b];
        }
        ok = ok && evalnet_embed_images(&a.e, im8, 8, u, z) == MS_OK && evalnet_embed_texts(&a.e, tok, cp, 8, v) == MS_OK;
        for (int b = 0; b < 8 && ok; b++) {
            double own = 0.0;
            for (int k = 0; k < E; k++) own += (double)u[b * E + k] * v[b * E + k];
            rk[b] = 1;
            for (int j = 0; j < 8; j++) {
                double c = 0.0;
                for (int k = 0; k < E; k++) c += (double)u[b * E + k] * v[j * E + k];
                rk[b] += j != b && c > own;
            }
        }
        JsonValue *jm = NULL, *js = NULL;
        snprintf(p, sizeof p, "%s/m.json", dir);
        ok = ok && json_parse_file(p, &jm) == MS_OK;
        snprintf(p, sizeof p, "%s/s.json", dir);
        ok = ok && json_parse_file(p, &js) == MS_OK;
        int same = ok;
        for (int b = 0; b < 8 && ok; b++) {
            const double r = json_get_number(json_at(json_get(jm, "images"), (size_t)b), "caption_rank", NAN);
            same &= r == rk[b];
            top_m += rk[b] == 1;
            top_s += json_get_number(json_at(json_get(js, "images"), (size_t)b), "caption_rank", NAN) == 1.0;
        }
        check(same, "caption ranks of the 8 scenes among their 8 captions == recomputed from the encoders");
        int distinct = 0;
        for (int b = 0; b < 8; b++) {
            int first = 1;
            for (int q = 0; q < b; q++) first &= strcmp(caps[q], caps[b]) != 0;
            distinct += first;
        }
        check(ok && json_get_number(jm, "caption_top1", NAN) == top_m / 8.0 && json_get_number(jm, "distinct_prompts", NAN) == distinct,
              "caption_top1 %d/8, %d distinct prompts", top_m, distinct);
        check(top_m > top_s, "caption retrieval top-1: matched %d/8 > shuffled %d/8", top_m, top_s);
        json_free(jm); json_free(js);
        ms_free_aligned(im8); free(u); free(z); free(v);
    }
    snprintf(refa, sizeof refa, "A=%s/refA", dir);
    snprintf(refb, sizeof refb, "B=%s/refB", dir);
    snprintf(gen, sizeof gen, "%s/gen", dir);
    snprintf(outp, sizeof outp, "%s/g", dir);
    args[2] = gen; args[7] = "--ref"; args[8] = refa; args[9] = "--ref"; args[10] = refb;
    check(cmd_eval(11, args) == 0, "mixshow eval (two references)");
    {
        JsonValue *j = NULL;
        snprintf(p, sizeof p, "%s/g.json", dir);
        double own = NAN, other = NAN;
        int no_ranks = 0;
        if (json_parse_file(p, &j) == MS_OK) {
            const JsonValue *im = json_get(j, "images"), *t1 = json_get(j, "caption_top1");
            own = json_get_number(json_at(im, 0), "image_alignment", NAN);
            other = json_get_number(json_at(im, 1), "image_alignment", NAN);
            no_ranks = t1 && t1->type == JSON_NULL && json_get_number(j, "distinct_prompts", NAN) == 1 &&
                       !json_get(json_at(im, 0), "caption_rank");
        }
        json_free(j);
        check(no_ranks, "one distinct prompt (\"a creature\" twice): no caption ranks, caption_top1 null");
        check(own > other, "image alignment of a render of A: A's reference %.4f > B's %.4f", own, other);
    }
    snprintf(p, sizeof p, "%s/g.csv", dir);
    FILE *f = fopen(p, "r");
    check(f != NULL, "CSV written");
    if (f) fclose(f);
    /* --sheet --sheet-cols 3 on the 8 matched scenes: a 3 x 3 grid of S x S tiles with 2-pixel gaps, and one HTML
     * page with the 8 tiles embedded and their prompts */
    snprintf(outp, sizeof outp, "%s/sh", dir);
    args[2] = img_dir; args[7] = "--sheet"; args[8] = "--sheet-cols"; args[9] = "3";
    check(cmd_eval(10, args) == 0, "mixshow eval --sheet: %s", ms_last_error());
    {
        MsImage im;
        snprintf(p, sizeof p, "%s/sh.png", dir);
        const int want = 3 * (S + 2) + 2;
        int ok = ms_image_read(p, 3, &im) == MS_OK;
        check(ok && im.w == want && im.h == want, "contact sheet %dx%d (want %dx%d)", ok ? im.w : -1, ok ? im.h : -1, want, want);
        if (ok) {
            /* tile 4 (row 1, column 1) is s4.png's pixels */
            MsImage t4;
            memset(&t4, 0, sizeof t4);
            snprintf(p, sizeof p, "%s/s4.png", dir);
            int same = ms_image_read(p, 3, &t4) == MS_OK;
            for (int y = 0; same && y < S; y++)
                same = !memcmp((const uint8_t *)im.data + ((size_t)(2 + (S + 2) + y) * want + 2 + (S + 2)) * 3,
                               (const uint8_t *)t4.data + (size_t)y * S * 3, (size_t)S * 3);
            check(same, "contact sheet tile 4 == s4.png");
            if (t4.data) ms_image_free(&t4);
            ms_image_free(&im);
        }
        char *html = NULL;
        snprintf(p, sizeof p, "%s/sh.html", dir);
        FILE *h = fopen(p, "rb");
        int n_img = 0;
        if (h) {
            html = (char *)calloc(1 << 20, 1);
            if (html) { size_t got = fread(html, 1, (1 << 20) - 1, h); html[got] = '\0'; }
            fclose(h);
        }
        for (const char *q = html; q && (q = strstr(q, "data:image/png;base64,")); q++) n_img++;
        check(html && n_img == 8 && strstr(html, caps[5]) != NULL, "HTML page: %d embedded images (8), prompts shown", n_img);
        free(html);
    }
    snprintf(p, sizeof p, "rm -rf '%s'", dir);
    if (system(p) != 0) printf("  (could not remove %s)\n", dir);
    ms_free_aligned(img); free(caps);
    run_free(&a);
}

/* `mixshow eval --train-encoders` (a few steps of a small config): the encoders file's text token
 * table against the final checkpoint: rows that never had a gradient (AdamW second moment exactly
 * 0) are zero, all other rows and tensors equal the checkpoint's bitwise; independently, the kept
 * rows are exactly the ids of the captions of the steps' batches (eval_world_batch, tokenized).
 * --half (a resumed run) writes the same file as `convert --half` of the F32 one, whose weights
 * are the F32 ones rounded to F16; the scores of both files on the same images are compared. */
static int token_row_zero(const float *x, int D) {
    for (int d = 0; d < D; d++) if (x[d] != 0.0f) return 0;
    return 1;
}

static void test_train_command(const ClipTokenizer *tok) {
    char dir[256], tr[300], tr2[320], enc[400], enc16[400], enc16b[400], ck[400], p[600], outp[400];
    const int S = 32, steps = 6;
    snprintf(dir, sizeof dir, "/tmp/ms_test_evalnet_cmd_%ld", test_pid());
    mkdir(dir, 0777);
    snprintf(tr, sizeof tr, "%s/tr", dir);
    snprintf(tr2, sizeof tr2, "%s/tr_half", dir);
    char *args[] = { "eval", "--train-encoders", tr, "--steps", "6", "--checkpoint-every", "3", "--batch-text", "8",
                     "--batch-id", "8", "--per-id", "2", "--identities", "16", "--size", "32", "--channels", "8,16,32",
                     "--text-width", "16", "--seed", "5", "-q", NULL, NULL, NULL };
    int na = 24;
    const double t0 = ms_time();
    if (!check(cmd_eval(na, args) == 0, "mixshow eval --train-encoders (6 steps): %s", ms_last_error())) return;
    printf("  eval --train-encoders, 6 small steps + held-out: %.1f s\n", ms_time() - t0);
    snprintf(enc, sizeof enc, "%s/encoders.safetensors", tr);
    snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", tr);
    EvalNet e;
    StFile f;
    if (!check(evalnet_load(enc, &e, NULL, NULL) == MS_OK, "load %s: %s", enc, ms_last_error())) return;
    if (!check(st_open(&f, ck) == MS_OK, "open %s: %s", ck, ms_last_error())) { evalnet_free(&e); return; }
    {
        const int it = ms_param_find(&e.text, "text_model.embeddings.token_embedding.weight");
        const MsParam *q = &e.text.p[it];
        const int V = (int)q->shape[0], D = (int)q->shape[1], T = e.cfg.text.max_position_embeddings;
        float *ckt = NULL, *v = NULL;
        size_t n1 = 0, n2 = 0;
        unsigned char *seen = (unsigned char *)calloc((size_t)V, 1);
        const size_t nn = e.net.mem_bytes / sizeof(float);
        int ok = seen && st_load_f32(&f, "text_encoder.text_model.embeddings.token_embedding.weight", &ckt, &n1) == MS_OK &&
                 n1 == (size_t)V * D && st_load_f32(&f, "adam.v", &v, &n2) == MS_OK &&
                 n2 == nn + e.text.mem_bytes / sizeof(float);
        if (check(ok, "checkpoint token table and moments: %s", ms_last_error())) {
            /* the captions of the 6 steps, as cmd_eval draws them (seed 5, 16 identities, 8 + 8 images, pairs) */
            EvalData d = { 5, 16, 8, 8, 2, 4, 0 };
            float *img = (float *)ms_alloc_aligned((size_t)16 * 3 * S * S, sizeof(float));
            char (*caps)[EVAL_CAPTION] = (char (*)[EVAL_CAPTION])malloc((size_t)8 * EVAL_CAPTION);
            int32_t *ids = (int32_t *)malloc((size_t)T * sizeof(int32_t));
            int labels[8];
            for (int k = 1; img && caps && ids && k <= steps; k++) {
                if (eval_world_batch(&d, S, k, img, caps, labels) != MS_OK) { ok = 0; break; }
                for (int b = 0; b < 8; b++)
                    if (clip_tokenize(tok, caps[b], strlen(caps[b]), ids, T) == MS_OK)
                        for (int j = 0; j < T; j++) seen[ids[j]] = 1;
            }
            const float *vt = v + nn + (q->f32 - (const float *)e.text.mem);
            int kept = 0, n_seen = 0, rows_ok = 1, match = 1, zero_had_no_grad = 1;
            for (int id = 0; id < V; id++) {
                const float *row = q->f32 + (size_t)id * D;
                const int zero = token_row_zero(row, D), grad = !token_row_zero(vt + (size_t)id * D, D);
                n_seen += seen[id];
                if (!zero) { kept++; rows_ok &= !memcmp(row, ckt + (size_t)id * D, (size_t)D * sizeof(float)); }
                zero_had_no_grad &= !zero || !grad;
                rows_ok &= zero || grad;
                match &= seen[id] == !zero;
            }
            check(ok && rows_ok && zero_had_no_grad && kept > 0 && kept < V,
                  "encoders file: %d token rows kept (a gradient; == the checkpoint's bitwise), %d zeroed (AdamW moment 0)",
                  kept, V - kept);
            check(ok && match && n_seen == kept, "kept rows == the ids of the 6 steps' %d captions (%d ids)", 6 * 8, n_seen);
            ms_free_aligned(img); free(caps); free(ids);
        }
        /* every other tensor as in the checkpoint */
        const MsParamTable *tab[2] = { &e.net, &e.text };
        const char *pre[2] = { "", "text_encoder." }, *bad = NULL;
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < tab[j]->n; i++) {
                const MsParam *r = &tab[j]->p[i];
                char key[MS_KEY_MAX + 16];
                float *x = NULL;
                size_t nx = 0;
                if ((r->flags & MS_PARAM_BUFFER) || (j == 1 && i == it)) continue;
                snprintf(key, sizeof key, "%s%s", pre[j], r->name);
                if (st_load_f32(&f, key, &x, &nx) || nx != r->numel || memcmp(x, r->f32, nx * sizeof(float))) bad = r->name;
                ms_free_aligned(x);
            }
        check(!bad, "every other tensor of the encoders file == the checkpoint's bitwise%s%s", bad ? " -- NO: " : "", bad ? bad : "");
        ms_free_aligned(ckt); ms_free_aligned(v); free(seen);
    }
    st_close(&f);
    /* F16: --half on a resumed run (nothing left to train) and convert --half of the F32 file */
    args[2] = tr2; args[na++] = "--resume"; args[na++] = ck; args[na++] = "--half";
    check(cmd_eval(na, args) == 0, "mixshow eval --train-encoders --resume (at its last step) --half: %s", ms_last_error());
    snprintf(enc16, sizeof enc16, "%s/encoders.safetensors", tr2);
    snprintf(enc16b, sizeof enc16b, "%s/enc16.safetensors", dir);
    {
        char *cargs[] = { "convert", enc, enc16b, "--half" };
        check(cmd_convert(4, cargs) == 0, "mixshow convert encoders.safetensors enc16.safetensors --half: %s", ms_last_error());
    }
    {
        StFile a, b;
        int same = st_open(&a, enc16) == MS_OK;
        if (same) { same = st_open(&b, enc16b) == MS_OK; if (same) { same = a.size == b.size && !memcmp(a.buf, b.buf, a.size); st_close(&b); } st_close(&a); }
        check(same, "--half training output == convert --half of the F32 file, byte for byte");
    }
    EvalNet h;
    if (check(evalnet_load(enc16, &h, NULL, NULL) == MS_OK, "load the F16 file: %s", ms_last_error())) {
        int rounded = 1;
        StFile g;
        if (st_open(&g, enc16) == MS_OK) {
            rounded = g.count > 0 && g.tensors[0].dtype == ST_F16;
            st_close(&g);
        }
        const MsParamTable *ta[2] = { &e.net, &e.text }, *tb[2] = { &h.net, &h.text };
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < ta[j]->n; i++) {
                const MsParam *x = &ta[j]->p[i], *y = &tb[j]->p[i];
                if (x->flags & MS_PARAM_BUFFER) continue;
                for (size_t k = 0; k < x->numel && rounded; k++) rounded = y->f32[k] == st_f16_to_f32(st_f32_to_f16(x->f32[k]));
            }
        check(rounded, "F16 file: F16 tensors, each weight == the F32 weight rounded to F16");
        evalnet_free(&h);
    }
    /* scores of both files on 8 world scenes with their captions, and a creature against references */
    {
        EvalData d = { 11, 16, 8, 8, 2, 4, 0 };
        float *img = (float *)ms_alloc_aligned((size_t)16 * 3 * S * S, sizeof(float));
        char (*caps)[EVAL_CAPTION] = (char (*)[EVAL_CAPTION])malloc((size_t)8 * EVAL_CAPTION);
        int labels[8];
        FILE *fm;
        eval_world_batch(&d, S, 77, img, caps, labels);
        snprintf(p, sizeof p, "%s/img", dir); mkdir(p, 0777);
        snprintf(p, sizeof p, "%s/ref", dir); mkdir(p, 0777);
        snprintf(p, sizeof p, "%s/img/prompts.txt", dir);
        fm = fopen(p, "w");
        for (int b = 0; b < 8; b++) {
            snprintf(p, sizeof p, "%s/img/s%d.png", dir, b);
            png_of(p, img + (size_t)b * 3 * S * S, S);
            if (fm) fprintf(fm, "s%d.png\t%s\tC\n", b, caps[b]);
            snprintf(p, sizeof p, "%s/ref/r%d.png", dir, b);
            png_of(p, img + (size_t)(8 + b) * 3 * S * S, S);
        }
        if (fm) fclose(fm);
        double ta32[8], ia32[8], worst_t = 0.0, worst_i = 0.0;
        int ok = 1;
        for (int pass = 0; pass < 2; pass++) {
            char imgs[500], ref[500], json[500];
            snprintf(imgs, sizeof imgs, "%s/img", dir);
            snprintf(ref, sizeof ref, "C=%s/ref", dir);
            snprintf(outp, sizeof outp, "%s/score%d", dir, pass);
            char *eargs[] = { "eval", "--images", imgs, "--encoders", pass ? enc16 : enc, "--ref", ref, "--out", outp };
            ok &= cmd_eval(9, eargs) == 0;
            JsonValue *j = NULL;
            snprintf(json, sizeof json, "%s.json", outp);
            if (json_parse_file(json, &j) != MS_OK) { ok = 0; continue; }
            const JsonValue *im = json_get(j, "images");
            for (int b = 0; b < 8; b++) {
                const double t = json_get_number(json_at(im, (size_t)b), "text_alignment", NAN);
                const double i2 = json_get_number(json_at(im, (size_t)b), "image_alignment", NAN);
                if (!pass) { ta32[b] = t; ia32[b] = i2; continue; }
                if (!(fabs(t - ta32[b]) <= worst_t)) worst_t = fabs(t - ta32[b]);
                if (!(fabs(i2 - ia32[b]) <= worst_i)) worst_i = fabs(i2 - ia32[b]);
            }
            json_free(j);
        }
        printf("  F16 vs F32 encoders, 8 images: max |text alignment difference| %.3g, max |image alignment difference| %.3g\n",
               worst_t, worst_i);
        check(ok && worst_t < 1e-2 && worst_i < 1e-2, "F16 vs F32 encoders: scores within 1e-2 (text %.3g, image %.3g)", worst_t, worst_i);
        ms_free_aligned(img); free(caps);
    }
    evalnet_free(&e);
    snprintf(p, sizeof p, "rm -rf '%s'", dir);
    if (system(p) != 0) printf("  (could not remove %s)\n", dir);
}

int main(void) {
    ClipTokenizer tok;
    ms_rng_seed(&rng, 42);
    test_ops();
    test_trunk();
    if (!check(load_tokenizer(&tok), "shipped CLIP tokenizer %s", ms_last_error())) return test_summary("test_evalnet");
    test_step_grad(&tok);
    test_training(&tok);
    test_cli(&tok);
    test_train_command(&tok);
    test_token_max_norm();
    clip_tokenizer_free(&tok);
    test_free_tracked();
    return test_summary("test_evalnet");
}
