/* mixshow.c — the method of Mix-of-Show (Gu et al., NeurIPS 2023, arXiv:2305.18292v2), in
 * sections:
 *   ED-LoRA step + AdamW        (single-client tuning; issue: ED-LoRA training)
 *   gradient fusion + L-BFGS    (center node; issue: gradient fusion)
 *   regionally controllable sampling
 *   text-to-image pipeline      (diffusers StableDiffusion(Adapter)Pipeline: `mixshow sample`)
 * Only the text-to-image pipeline is written so far. */
#include "mixshow.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *ms_version(void) { return MS_VERSION; }

/* ---- ED-LoRA training ---- */
/* Defaults of Mix-of-Show's EDLoRATrainer(...) arguments and of torch.optim.AdamW. */
void ms_train_config_defaults(MsTrainConfig *c) {
    memset(c, 0, sizeof *c);
    c->enable_edlora = 1;
    c->tune_emb = c->tune_te = c->tune_unet = 1;
    c->lr_emb = 1e-3; c->lr_te = 1e-5; c->lr_unet = 1e-4;
    c->wd_emb = NAN;
    c->te_rank = c->unet_rank = 4;
    c->te_alpha = c->unet_alpha = 1.0;
    c->reg_full_identity = 1;              /* EDLoRATrainer(reg_full_identity=True) */
    c->use_mask_loss = 1;                  /* EDLoRATrainer(use_mask_loss=True) */
    c->weight_decay = 0.01;                /* torch.optim.AdamW defaults */
    c->beta1 = 0.9; c->beta2 = 0.999; c->adam_eps = 1e-8;
    c->emb_norm_threshold = 0.55;          /* train_opt.get('emb_norm_threshold', 5.5e-1) */
}

/* Mix-of-Show's single-client stage (paper Sec. 3.2, "ED-LoRA"; official code: EDLoRATrainer in
 * mixofshow/pipelines/trainer_edlora.py and the loop of train_edlora.py, commit 51270fd). One
 * step, as the official trainer runs it on float32:
 *
 *   1. z   = (mean + exp(logvar / 2) * eps) * 0.18215      VAE posterior SAMPLE (0.18215 is
 *                                                          hard-coded there, not the config's)
 *   2. n   = randn;  n += noise_offset * randn(B,4,1,1)    (when noise_offset is set)
 *   3. t   = randint(0, T, (B,));  z_t = sqrt(ac_t) z + sqrt(1 - ac_t) n      (DDPM add_noise)
 *   4. prompts bound x16: prompt i has every concept word replaced by its i-th token <new..>
 *   5. c   = TextEncoder(ids) (B*16, 77, D), rearranged '(b n) m c -> b n m c': cross-attention
 *            layer i of the UNet (order down, mid, up) attends to c[:, i]
 *   6. eps = UNet(z_t, t, c) with LoRA on every attention Linear
 *   7. L   = mean_b [ sum (eps - n)^2 * mask / sum mask ]  (float64: the masks are float64)
 *          + attention regularisation (cal_attn_reg) unless it is NaN
 *   8. backward by hand through UNet and text encoder into the LoRA weights and the new rows
 *   9. AdamW on three groups (embedding, text-encoder LoRA, UNet LoRA), linear lr decay;
 *      every other embedding row keeps its value; the concept rows stop moving once their mean
 *      L2 norm reaches emb_norm_threshold (checked after the update).
 * Plain LoRA (enable_edlora false) is the same code with one token per word that no prompt
 * uses (the official code adds them but does not bind prompts), and one context for all layers. */

#define TRAIN_T 77                  /* tokenizer.model_max_length */
#define TRAIN_EDLORA_LAYERS 16      /* bind_concept_prompt's 16 (fixed in the official code) */
#define TRAIN_VAE_SCALE 0.18215f    /* latents * 0.18215 in EDLoRATrainer.forward */

typedef struct {
    char name[MS_KEY_MAX + 32];     /* "token_embedding.concept", "unet.<module>.lora_down.weight" */
    float *data, *grad, *m, *v;
    int ndim;
    int64_t shape[2];
    size_t n;
    int group;                      /* 0 embedding, 1 text-encoder LoRA, 2 UNet LoRA */
} TrainParam;

struct MsTrainer {
    MsTrainConfig cfg;
    const MsModel *model;
    ClipTokenizer *tok;
    int B, H, W, h, w, L;           /* batch, image size, latent size, tokens per word (16 or 1) */
    int n_tok, first_id;            /* concept tokens (L * n_words), id of <new0> */
    int D, n_cross;                 /* text width, UNet cross-attention layers */
    ClipTextParams tp;
    VaeParams vp;
    UNetParams up;
    int up_ok, ua_ok;
    MsScheduler *sch;
    /* trainable state, group by group; each with grad and AdamW moments */
    float *emb, *demb, *m_emb, *v_emb;          /* (n_tok, D): the rows of <new0>, <new1>, ... */
    float *emb_frozen;                          /* concept rows at the freeze (official_embedding) */
    float *te, *dte, *m_te, *v_te;              /* clip_lora_numel floats */
    ClipLora te_lora, te_grad;
    UNetLora u_lora, u_grad;
    float *m_u, *v_u;
    int te_on, u_on;
    TrainParam *par;
    int n_par;
    /* activations and work buffers */
    Arena text_ar, uacts, uscr, vae_ar, lora_ar;
    ClipTextActs ta;
    UNetActs ua;
    float *mean, *logvar, *lat, *noise, *noisy, *pred, *dpred, *hid_d;
    float *ctx[TRAIN_EDLORA_LAYERS], *dctx[TRAIN_EDLORA_LAYERS];
    int32_t *ids;                               /* (B*L, 77) */
    int32_t *cols;                              /* (B, 2) attention-regulariser key positions */
    float *probe[TRAIN_EDLORA_LAYERS], *dprobe[TRAIN_EDLORA_LAYERS];
    int attn_reg;                               /* the regulariser runs */
    /* loop state */
    int64_t step;                               /* optimizer steps taken */
    int stop_emb;                               /* stop_emb_update */
};

/* Heads and map size (h x w latent pixels) of cross-attention layer l (order down, mid, up),
 * for a latent of h0 x w0: each downsampler halves a side rounding up (3x3, stride 2, pad 1). */
static void unet_probe_shape_cfg(const UNetConfig *c, int h0, int w0, int l, int *heads, int *lh, int *lw) {
    int H[MS_MAX_BLOCKS], Wd[MS_MAX_BLOCKS], n = c->n_blocks, k = 0;
    H[0] = h0; Wd[0] = w0;
    for (int i = 1; i < n; i++) { H[i] = (H[i - 1] + 1) / 2; Wd[i] = (Wd[i - 1] + 1) / 2; }
    *heads = *lh = *lw = 0;
    for (int part = 0; part < 3; part++)
        for (int i = 0; i < (part == 1 ? 1 : n); i++) {
            int lv = part == 0 ? i : n - 1 - i;
            MsBlockType bt = part == 0 ? c->down_block_types[i] : part == 1 ? c->mid_block_type : c->up_block_types[i];
            int cross = bt == MS_BLOCK_CROSS_ATTN_DOWN || bt == MS_BLOCK_CROSS_ATTN_UP || bt == MS_BLOCK_MID_CROSS_ATTN;
            int cnt = part == 0 ? c->layers_per_block : part == 1 ? 1 : c->layers_per_block + 1;
            if (!cross) continue;
            cnt *= c->transformer_layers_per_block[lv];
            if (l < k + cnt) { *heads = ms_unet_heads(c, lv); *lh = H[lv]; *lw = Wd[lv]; return; }
            k += cnt;
        }
}

static double train_lr(const MsTrainer *t, double base, int64_t k) {
    /* diffusers get_scheduler('linear', warmup 0, num_training_steps = total_iter) after k - 1
     * scheduler steps: base * max(0, (T - (k-1)) / max(1, T)), T a float (len / batch). */
    double T = t->cfg.total_iter, f = (T - (double)(k - 1)) / (T > 1.0 ? T : 1.0);
    return base * (f > 0.0 ? f : 0.0);
}

static MsStatus train_add_param(MsTrainer *t, const char *name, float *data, float *grad, float *m, float *v,
                                int64_t rows, int64_t cols, int group) {
    TrainParam *p = &t->par[t->n_par++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->data = data; p->grad = grad; p->m = m; p->v = v;
    p->ndim = 2; p->shape[0] = rows; p->shape[1] = cols;
    p->n = (size_t)rows * (size_t)cols;
    p->group = group;
    return MS_OK;
}

/* Official module order: CLIPAttention registers k_proj, v_proj, q_proj, out_proj;
 * UNet2DConditionModel registers down_blocks, up_blocks, then mid_block. */
static void train_register(MsTrainer *t) {
    const ClipTextConfig *tc = &t->model->text_config;
    char nm[MS_KEY_MAX + 32], mod[MS_KEY_MAX];
    static const int te_order[4] = { CLIP_K, CLIP_V, CLIP_Q, CLIP_O };
    static const char *const te_name[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
    t->n_par = 0;
    train_add_param(t, "token_embedding.concept", t->emb, t->demb, t->m_emb, t->v_emb, t->n_tok, t->D, 0);
    if (t->te_on)
        for (int l = 0; l < tc->num_hidden_layers; l++)
            for (int j = 0; j < 4; j++) {
                int pj = te_order[j], r = t->te_lora.rank;
                size_t off_d = (size_t)(t->te_lora.down[l][pj] - t->te), off_u = (size_t)(t->te_lora.up[l][pj] - t->te);
                snprintf(nm, sizeof nm, "text_encoder.text_model.encoder.layers.%d.self_attn.%s.lora_down.weight", l, te_name[pj]);
                train_add_param(t, nm, t->te + off_d, t->dte + off_d, t->m_te + off_d, t->v_te + off_d, r, t->D, 1);
                snprintf(nm, sizeof nm, "text_encoder.text_model.encoder.layers.%d.self_attn.%s.lora_up.weight", l, te_name[pj]);
                train_add_param(t, nm, t->te + off_u, t->dte + off_u, t->m_te + off_u, t->v_te + off_u, t->D, r, 1);
            }
    if (t->u_on)
        for (int part = 0; part < 3; part++)          /* down_blocks, up_blocks, mid_block */
            for (int a = 0; a < t->u_lora.n_attn; a++) {
                static const char *const pre[3] = { "down_blocks", "up_blocks", "mid_block" };
                unet_lora_module_name(&t->up, a, 0, mod, sizeof mod);
                if (strncmp(mod, pre[part], strlen(pre[part]))) continue;
                for (int which = 0; which < 4; which++) {
                    UNetLoraLinear *x = &t->u_lora.lin[4 * a + which], *g = &t->u_grad.lin[4 * a + which];
                    size_t od = (size_t)(x->down - t->u_lora.data), ou = (size_t)(x->up - t->u_lora.data);
                    int r = t->u_lora.rank;
                    unet_lora_module_name(&t->up, a, which, mod, sizeof mod);
                    snprintf(nm, sizeof nm, "unet.%s.lora_down.weight", mod);
                    train_add_param(t, nm, x->down, g->down, t->m_u + od, t->v_u + od, r, x->in, 2);
                    snprintf(nm, sizeof nm, "unet.%s.lora_up.weight", mod);
                    train_add_param(t, nm, x->up, g->up, t->m_u + ou, t->v_u + ou, x->out, r, 2);
                }
            }
}

int ms_trainer_n_params(const MsTrainer *t) { return t->n_par; }

MsStatus ms_trainer_param(const MsTrainer *t, int i, const char **name, float **data, float **grad,
                          int64_t shape[2]) {
    if (i < 0 || i >= t->n_par) return ms_errorf(MS_ERR_ARG, "trainer: parameter %d of %d", i, t->n_par);
    const TrainParam *p = &t->par[i];
    if (name) *name = p->name;
    if (data) *data = p->data;
    if (grad) *grad = p->grad;
    if (shape) { shape[0] = p->shape[0]; shape[1] = p->shape[1]; }
    return MS_OK;
}

int ms_trainer_find_param(const MsTrainer *t, const char *name) {
    for (int i = 0; i < t->n_par; i++)
        if (!strcmp(t->par[i].name, name)) return i;
    return -1;
}

int ms_trainer_tokens(const MsTrainer *t, int *first_id) {
    if (first_id) *first_id = t->first_id;
    return t->L;
}

/* Optimizer state for checkpoints: every float of the trainable state in one fixed order
 * (parameters, then first moments, then second moments, group by group). */
size_t ms_trainer_state_floats(const MsTrainer *t) {
    size_t n = 0;
    for (int i = 0; i < t->n_par; i++) n += 3 * t->par[i].n;
    return n + (size_t)t->n_tok * t->D;                 /* + the frozen concept rows */
}
void ms_trainer_state_io(MsTrainer *t, float *buf, int store, int64_t *step, int *stop_emb) {
    size_t k = 0;
    for (int i = 0; i < t->n_par; i++) {
        TrainParam *p = &t->par[i];
        float *src[3] = { p->data, p->m, p->v };
        for (int j = 0; j < 3; j++) {
            if (store) memcpy(buf + k, src[j], p->n * sizeof(float));
            else memcpy(src[j], buf + k, p->n * sizeof(float));
            k += p->n;
        }
    }
    if (store) memcpy(buf + k, t->emb_frozen, (size_t)t->n_tok * t->D * sizeof(float));
    else memcpy(t->emb_frozen, buf + k, (size_t)t->n_tok * t->D * sizeof(float));
    if (store) { *step = t->step; *stop_emb = t->stop_emb; }
    else { t->step = *step; t->stop_emb = *stop_emb; }
}

int64_t ms_trainer_step_count(const MsTrainer *t) { return t->step; }

void ms_trainer_free(MsTrainer *t) {
    if (!t) return;
    if (t->ua_ok) unet_acts_free(&t->ua);
    if (t->up_ok) unet_params_free(&t->up);
    arena_free(&t->text_ar); arena_free(&t->uacts); arena_free(&t->uscr); arena_free(&t->vae_ar);
    arena_free(&t->lora_ar);
    ms_free_aligned(t->emb); ms_free_aligned(t->te); ms_free_aligned(t->mean);
    free(t->par);
    free(t->sch);
    free(t);
}

/* LoRALinearLayer.__init__ as the official code runs it, for one (down (r,in), up (out,r)):
 * nn.Linear(in, r) and nn.Linear(r, out) each draw kaiming_uniform_(a=sqrt(5)) at construction,
 * then kaiming_uniform_(down) again and zeros_(up). kaiming_uniform_ with a = sqrt(5):
 * bound = sqrt(2 / (1 + 5)) * sqrt(3 / fan_in) = 1 / sqrt(fan_in), uniform_(-bound, bound). */
static void torch_uniform(MsTorchRng *g, float *x, size_t n, double lo, double hi) {
    /* at::uniform_real_distribution<float>: (random() & (2^24 - 1)) * 2^-24 in double,
     * * (to - from) + from with to, from as float. */
    const float from = (float)lo, to = (float)hi;
    for (size_t i = 0; i < n; i++) {
        uint32_t r = ms_torch_random(g);
        double u = (double)(r & ((1u << 24) - 1)) * (1.0 / 16777216.0);
        x[i] = (float)(u * (double)(to - from) + (double)from);
    }
}
static void lora_init_official(MsTorchRng *g, float *down, float *up, int r, int in, int out) {
    double bd = 1.0 / sqrt((double)in), bu = 1.0 / sqrt((double)r);
    torch_uniform(g, down, (size_t)r * in, -bd, bd);
    torch_uniform(g, up, (size_t)out * r, -bu, bu);
    torch_uniform(g, down, (size_t)r * in, -bd, bd);
    memset(up, 0, (size_t)out * r * sizeof(float));
}

MsStatus ms_trainer_create(MsTrainer **out, const MsModel *m, ClipTokenizer *tok, const MsTrainConfig *c,
                           int B, int H, int W, MsTorchRng *g) {
    const UNetConfig *uc = &m->unet_config;
    const ClipTextConfig *tc = &m->text_config;
    const VaeConfig *vc = &m->vae_config;
    const int f = 1 << (vc->n_blocks - 1);
    MsStatus s;
    *out = NULL;
    if (c->n_words < 1 || c->n_words > MS_MAX_CONCEPT_WORDS)
        return ms_errorf(MS_ERR_ARG, "train: %d concept words (expected 1..%d)", c->n_words, MS_MAX_CONCEPT_WORDS);
    if (B < 1 || B > 64) return ms_errorf(MS_ERR_ARG, "train: batch size %d (expected 1..64)", B);
    if (H <= 0 || W <= 0 || H % f || W % f)
        return ms_errorf(MS_ERR_ARG, "train: image %d x %d: sides must be positive multiples of %d", W, H, f);
    if (uc->cross_attention_dim != tc->hidden_size)
        return ms_errorf(MS_ERR_ARG, "train: UNet cross_attention_dim %d != text hidden_size %d",
                         uc->cross_attention_dim, tc->hidden_size);
    MsTrainer *t = (MsTrainer *)calloc(1, sizeof *t);
    if (!t) return ms_errorf(MS_ERR_NOMEM, "train: out of memory");
    t->cfg = *c; t->model = m; t->tok = tok;
    t->B = B; t->H = H; t->W = W; t->h = H / f; t->w = W / f;
    t->L = c->enable_edlora ? TRAIN_EDLORA_LAYERS : 1;
    t->D = tc->hidden_size;
    t->n_cross = ms_unet_cross_attn_layers(uc);
    t->n_tok = t->L * c->n_words;
    t->te_on = c->tune_te && c->te_rank > 0;
    t->u_on = c->tune_unet && c->unet_rank > 0;
    if (c->enable_edlora && t->n_cross > TRAIN_EDLORA_LAYERS) {
        s = ms_errorf(MS_ERR_UNSUPPORTED, "train: the UNet has %d cross-attention layers; ED-LoRA binds %d "
                      "(the official encoder_hidden_states[:, i] has no layer for the rest)", t->n_cross, TRAIN_EDLORA_LAYERS);
        goto fail;
    }
    /* Regulariser: EDLoRATrainer runs it whenever attn_reg_weight is not None. Plain LoRA has no
     * concept tokens in its prompts and crashes there; mixshow treats the term as off then. */
    t->attn_reg = c->has_attn_reg && c->enable_edlora;
    if (t->attn_reg && c->n_words < 2) {
        s = ms_errorf(MS_ERR_UNSUPPORTED, "train: attention regularisation needs two concept words "
                      "(cal_attn_reg reads the adjective and the subject token); %d given", c->n_words);
        goto fail;
    }

    /* concept tokens <new0>.. (init_new_concept): added to the tokenizer, ids after vocab_size */
    {
        char names[MS_MAX_CONCEPT_WORDS * TRAIN_EDLORA_LAYERS][24];
        const char *np[MS_MAX_CONCEPT_WORDS * TRAIN_EDLORA_LAYERS];
        int n_added = 0;
        for (int i = 0; i < t->n_tok; i++) { snprintf(names[i], sizeof names[i], "<new%d>", i); np[i] = names[i]; }
        for (int i = 0; i < t->n_tok; i++)
            if (clip_tokenizer_find(tok, np[i], strlen(np[i])) >= 0) {
                s = ms_errorf(MS_ERR_ARG, "train: token %s is already in the tokenizer (the official trainer "
                              "asserts 'some token is already in tokenizer')", np[i]);
                goto fail;
            }
        for (int w = 0; w < c->n_words; w++)
            if (clip_tokenizer_find(tok, c->words[w], strlen(c->words[w])) >= 0) {
                /* the official code would bind it all the same, but the word then also means
                 * what the vocabulary says it means wherever it is not bound */
                s = ms_errorf(MS_ERR_ARG, "train: concept word '%s' already exists in the vocabulary (id %d): "
                              "choose a word the tokenizer splits, such as <%s1>", c->words[w],
                              clip_tokenizer_find(tok, c->words[w], strlen(c->words[w])), c->words[w]);
                goto fail;
            }
        t->first_id = tok->n_vocab + tok->n_added;
        if (t->first_id != tc->vocab_size) {
            s = ms_errorf(MS_ERR_ARG, "train: the tokenizer's next id is %d but the text encoder has %d rows",
                          t->first_id, tc->vocab_size);
            goto fail;
        }
        if ((s = clip_tokenizer_add_tokens(tok, np, t->n_tok, &n_added))) goto fail;
        if (n_added != t->n_tok) { s = ms_errorf(MS_ERR_ARG, "train: %d of %d new tokens added", n_added, t->n_tok); goto fail; }
    }

    /* networks */
    if ((s = clip_text_params(&t->tp, &m->text, tc))) goto fail;
    if ((s = vae_params_init(&t->vp, vc, &m->vae))) goto fail;
    if ((s = unet_params_init(&t->up, uc, &m->unet))) goto fail;
    t->up_ok = 1;
    t->sch = (MsScheduler *)malloc(sizeof *t->sch);
    if (!t->sch) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto fail; }
    if ((s = ms_scheduler_init(t->sch, MS_SCHED_DDPM, &m->scheduler_config, MS_TORCH_CPU_AVX2))) goto fail;

    /* trainable state and work buffers */
    {
        const size_t ne = (size_t)t->n_tok * t->D, nte = t->te_on ? clip_lora_numel(tc, c->te_rank) : 0;
        const size_t nlat = (size_t)B * uc->in_channels * t->h * t->w, nout = (size_t)B * uc->out_channels * t->h * t->w;
        const size_t nctx = (size_t)B * TRAIN_T * t->D, nhid = (size_t)B * t->L * TRAIN_T * t->D;
        size_t nprobe = 0;
        t->emb = (float *)ms_alloc_aligned(5 * ne + 1, sizeof(float));
        t->te = (float *)ms_alloc_aligned(4 * nte + 1, sizeof(float));
        if (!t->emb || !t->te) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto fail; }
        memset(t->emb, 0, (5 * ne + 1) * sizeof(float));
        memset(t->te, 0, (4 * nte + 1) * sizeof(float));
        t->demb = t->emb + ne; t->m_emb = t->emb + 2 * ne; t->v_emb = t->emb + 3 * ne; t->emb_frozen = t->emb + 4 * ne;
        t->dte = t->te + nte; t->m_te = t->te + 2 * nte; t->v_te = t->te + 3 * nte;
        if (t->te_on) {
            clip_lora_bind(&t->te_lora, t->te, tc, c->te_rank, (float)c->te_alpha);
            clip_lora_bind(&t->te_grad, t->dte, tc, c->te_rank, (float)c->te_alpha);
        }
        if (t->u_on) {
            size_t nu = unet_lora_floats(uc, c->unet_rank);
            size_t lin = (size_t)2 * t->up.n_blk * 4 * sizeof(UNetLoraLinear);
            if ((s = arena_init(&t->lora_ar, 2 * (lin + 128) + 4 * (nu * sizeof(float) + 128)))) goto fail;
            if ((s = unet_lora_init(&t->u_lora, &t->up, c->unet_rank, (float)c->unet_alpha, &t->lora_ar))) goto fail;
            if ((s = unet_lora_init(&t->u_grad, &t->up, c->unet_rank, (float)c->unet_alpha, &t->lora_ar))) goto fail;
            t->m_u = arena_floats(&t->lora_ar, nu);
            t->v_u = arena_floats(&t->lora_ar, nu);
            if (!t->m_u || !t->v_u) { s = ms_errorf(MS_ERR_NOMEM, "train: LoRA arena too small"); goto fail; }
            memset(t->m_u, 0, nu * sizeof(float)); memset(t->v_u, 0, nu * sizeof(float));
        }
        if (t->attn_reg)
            for (int l = 0; l < t->n_cross; l++) {
                int hd, lh, lw;
                unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
                nprobe += (size_t)B * hd * lh * lw * 2 + 16;
            }
        {
            size_t need = 2 * nlat + 3 * nlat + 2 * nout + nhid + 2 * (size_t)(c->enable_edlora ? t->n_cross : 1) * nctx
                          + 2 * nprobe + (size_t)B * t->L * TRAIN_T + 2 * (size_t)B + 64 * 32;
            float *q = (float *)ms_alloc_aligned(need, sizeof(float));
            if (!q) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory (%zu floats of work buffers)", need); goto fail; }
            memset(q, 0, need * sizeof(float));
            t->mean = q; q += nlat; t->logvar = q; q += nlat; t->lat = q; q += nlat;
            t->noise = q; q += nlat; t->noisy = q; q += nlat; t->pred = q; q += nout; t->dpred = q; q += nout;
            t->hid_d = q; q += nhid;
            for (int l = 0; l < (c->enable_edlora ? t->n_cross : 1); l++) { t->ctx[l] = q; q += nctx; t->dctx[l] = q; q += nctx; }
            if (t->attn_reg)
                for (int l = 0; l < t->n_cross; l++) {
                    int hd, lh, lw;
                    unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
                    size_t np_ = (size_t)B * hd * lh * lw * 2;
                    t->probe[l] = q; q += np_ + 16;
                    t->dprobe[l] = q; q += np_ + 16;
                }
            t->ids = (int32_t *)q; q += (size_t)B * t->L * TRAIN_T;
            t->cols = (int32_t *)q; q += 2 * (size_t)B;
        }
        /* arenas: text encoder (B*L prompts), UNet training activations, VAE encode */
        if ((s = arena_init(&t->text_ar, clip_text_sizes(tc, B * t->L, TRAIN_T, t->te_on ? c->te_rank : 0, CLIP_TRAIN_RECOMPUTE)))) goto fail;
        if ((s = clip_text_acts_alloc(&t->ta, &t->text_ar, tc, B * t->L, TRAIN_T, t->te_on ? c->te_rank : 0, CLIP_TRAIN_RECOMPUTE))) goto fail;
        {
            UNetSizes us;
            VaeSizes vz;
            if ((s = unet_sizes(uc, B, t->h, t->w, TRAIN_T, 1, &us))) goto fail;
            if ((s = arena_init(&t->uacts, us.acts_bytes)) || (s = arena_init(&t->uscr, us.scratch_bytes))) goto fail;
            if ((s = unet_acts_init(&t->ua, uc, B, t->h, t->w, TRAIN_T, 1, &t->uacts, &t->uscr))) goto fail;
            t->ua_ok = 1;
            if ((s = vae_sizes(vc, H, W, -1, &vz))) goto fail;
            /* The VAE encodes before the UNet runs: its scratch borrows the UNet's activation
             * arena (whose contents each forward rewrites) when that is large enough, which it
             * is for SD 1.5 at 512² (1047 MiB vs 409 MiB): one arena fewer at the peak. */
            if (t->uacts.cap >= vz.encode_bytes) {
                t->vae_ar.base = t->uacts.base; t->vae_ar.cap = t->uacts.cap; t->vae_ar.used = 0; t->vae_ar.mem = NULL;
            } else if ((s = arena_init(&t->vae_ar, vz.encode_bytes))) goto fail;
        }
    }
    t->par = (TrainParam *)calloc((size_t)1 + 8 * CLIP_MAX_LAYERS + (t->u_on ? 8 * (size_t)t->u_lora.n_attn : 0), sizeof(TrainParam));
    if (!t->par) { s = ms_errorf(MS_ERR_NOMEM, "train: out of memory"); goto fail; }
    train_register(t);

    /* initial values in the official order of draws (EDLoRATrainer.__init__ after set_seed):
     * per word the embedding init (randn_like(token_embeds[0]) * sigma for <rand-sigma>, else the
     * class word's row), then the LoRA layers, text encoder first (train_register's order). */
    if (g) {
        int ti = ms_param_find(&m->text, "text_model.embeddings.token_embedding.weight");
        const MsParam *table = ti >= 0 ? &m->text.p[ti] : NULL;
        for (int wd = 0; wd < c->n_words; wd++) {
            float *row = t->emb + (size_t)wd * t->L * t->D;
            double sigma;
            /* text_encoder.resize_token_embeddings(len(tokenizer)) builds a new nn.Embedding whose
             * constructor fills all its rows with normal_() (transformers 4.31
             * _get_resized_embeddings; _init_weights leaves a plain nn.Embedding alone) before
             * the old rows are copied in: the draws are spent, the values overwritten. */
            ms_torch_randn_skip(g, (size_t)(t->first_id + (wd + 1) * t->L) * t->D);
            if (sscanf(c->init[wd], "<rand-%lf>", &sigma) == 1) {
                ms_torch_randn(g, row, (size_t)t->D, MS_TORCH_CPU_AVX2);
                for (int d = 0; d < t->D; d++) row[d] = row[d] * (float)sigma;
            } else {
                int32_t ids[8];
                size_t n_ids = 0;
                if ((s = clip_tokenize_raw(tok, c->init[wd], strlen(c->init[wd]), ids, 8, &n_ids))) goto fail;
                if (n_ids != 1 || ids[0] >= tc->vocab_size || !table || (!table->f32 && !table->half)) {
                    s = ms_errorf(MS_ERR_ARG, "train: initializer '%s' must be a single existing token "
                                  "(it is %zu tokens)", c->init[wd], n_ids);
                    goto fail;
                }
                if (table->f32) memcpy(row, table->f32 + (size_t)ids[0] * t->D, (size_t)t->D * sizeof(float));
                else ms_half_to_f32(row, table->half + (size_t)ids[0] * t->D, (size_t)t->D, table->dtype);
            }
            for (int i = 1; i < t->L; i++) memcpy(row + (size_t)i * t->D, row, (size_t)t->D * sizeof(float));
        }
        for (int i = 0; i < t->n_par; i++) {
            TrainParam *p = &t->par[i], *q = &t->par[i + 1];
            if (p->group == 0 || !strstr(p->name, ".lora_down.")) continue;
            lora_init_official(g, p->data, q->data, (int)p->shape[0], (int)p->shape[1], (int)q->shape[0]);
        }
    }
    memcpy(t->emb_frozen, t->emb, (size_t)t->n_tok * t->D * sizeof(float));
    *out = t;
    return MS_OK;
fail:
    ms_trainer_free(t);
    return s;
}

/* bind_concept_prompt: prompt i of L has every concept word replaced by its i-th token name. */
static MsStatus train_bind(char *out, size_t cap, const char *prompt, const MsTrainConfig *c, int L, int layer) {
    char a[2048], b[2048];
    if (strlen(prompt) >= sizeof a) return ms_errorf(MS_ERR_ARG, "train: prompt longer than %zu bytes", sizeof a - 1);
    strcpy(a, prompt);
    for (int wd = 0; wd < c->n_words; wd++) {              /* p.replace(concept_name, new_name) */
        char tokname[24];
        size_t wl = strlen(c->words[wd]), o = 0;
        const char *p = a, *q;
        snprintf(tokname, sizeof tokname, "<new%d>", wd * L + layer);
        if (!wl) continue;
        while ((q = strstr(p, c->words[wd]))) {
            size_t k = (size_t)(q - p), tl = strlen(tokname);
            if (o + k + tl >= sizeof b) return ms_errorf(MS_ERR_ARG, "train: bound prompt too long");
            memcpy(b + o, p, k); o += k;
            memcpy(b + o, tokname, tl); o += tl;
            p = q + wl;
        }
        if (o + strlen(p) >= sizeof b) return ms_errorf(MS_ERR_ARG, "train: bound prompt too long");
        strcpy(b + o, p);
        strcpy(a, b);
    }
    if (strlen(a) >= cap) return ms_errorf(MS_ERR_ARG, "train: bound prompt too long");
    strcpy(out, a);
    return MS_OK;
}

/* Masked epsilon loss as EDLoRATrainer.forward computes it:
 *   loss = F.mse_loss(pred, target, 'none')          float32: (p - t)^2
 *   loss = ((loss * mask).sum([1,2,3]) / mask.sum([1,2,3])).mean()   float64 (mask is float64)
 * mask (B,1,M) broadcast over the C channels: its sum counts each pixel once.
 * Backward (autograd's path): g_b = (1/B) / W_b (float64), d(loss*mask) = g_b * mask -> float32,
 *   dpred = (2 * (p - t)) * that  (mse_loss_backward in float32).                    */
static double train_masked_mse(float *dpred, const float *pred, const float *target, const double *mask,
                               int B, int C, int M) {
    double total = 0.0;
    for (int b = 0; b < B; b++) {
        double num = 0.0, den = 0.0;
        for (int m = 0; m < M; m++) den += mask[(size_t)b * M + m];
        for (int c = 0; c < C; c++)
            for (int m = 0; m < M; m++) {
                size_t i = ((size_t)b * C + c) * M + m;
                float d = pred[i] - target[i], sq = d * d;
                num += (double)sq * mask[(size_t)b * M + m];
            }
        total += num / den;
        double gb = (1.0 / B) / den;
        for (int c = 0; c < C; c++)
            for (int m = 0; m < M; m++) {
                size_t i = ((size_t)b * C + c) * M + m;
                float gm = (float)(gb * mask[(size_t)b * M + m]);
                dpred[i] = (2.0f * (pred[i] - target[i])) * gm;
            }
    }
    return total / B;
}

/* torch F.interpolate(mode='nearest') index: floor(dst * (float)(in / out)), clamped. */
static int train_nearest(int dst, int in, int out) {
    if (in == out) return dst;
    float scale = (float)in / (float)out;
    int s = (int)floorf((float)dst * scale);
    return s < in - 1 ? s : in - 1;
}

/* cal_attn_reg (trainer_edlora.py), for any latent size. For each resolution (every cross-
 * attention layer whose map has the same h x w; groups in decreasing size as the official dict
 * '64','32','16','8'), with P_l (B, heads_l, hw, 77) a layer's softmax probabilities:
 *   A[b,i,j] = mean over all heads of all layers of the group of P_l[b,hd,i,pos_b[j]]
 *   adj = A[..,0] / max(A[..,0]),  sub = A[..,1] / max(A[..,1])  (max over the whole batch)
 *   gt  = nearest-resized masks (B,h,w);  S = {gt == 0}
 *   l_sub = mean_S sub  (reg_full_identity: mean over all of (sub - gt)^2);  l_adj = mean_S adj
 *   L_attn = sum_groups w * (l_sub + l_adj)
 * NaN (an empty S) anywhere makes the whole term NaN; the official trainer then leaves it out.
 * Backward, per map a with normalised a^ = a / a_max and dL/da^ = G:
 *   da_i = G_i / a_max - [i is a max] * sum_k G_k a_k / a_max^2 / (number of maxima)
 *   (torch's max() spreads its gradient evenly over ties), dP_l[b,hd,i,j] = dA[b,i,j] / heads. */
static double train_attn_reg(MsTrainer *t, const double *masks, int want_grad) {
    const UNetConfig *uc = &t->model->unet_config;
    const int B = t->B, mh = t->h, mw = t->w;
    const double wgt = t->cfg.attn_reg_weight;
    int done[TRAIN_EDLORA_LAYERS] = { 0 };
    double total = 0.0;
    int nan = 0;
    for (int l = 0; l < t->n_cross; l++) {
        int hd, lh, lw;
        unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
        memset(t->dprobe[l], 0, (size_t)B * hd * lh * lw * 2 * sizeof(float));
    }
    for (;;) {
        /* next group: the largest unprocessed map size */
        int best = -1, bh = 0, bw = 0;
        for (int l = 0; l < t->n_cross; l++) {
            int hd, lh, lw;
            if (done[l]) continue;
            unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
            if (best < 0 || lh * lw > bh * bw) { best = l; bh = lh; bw = lw; }
        }
        if (best < 0) break;
        const size_t P = (size_t)bh * bw, n = (size_t)B * P;
        int heads_total = 0;
        double *A = (double *)calloc(4 * n + n, sizeof(double));
        if (!A) return NAN;
        double *dA = A + 2 * n, *gt = A + 4 * n;
        for (int l = 0; l < t->n_cross; l++) {
            int hd, lh, lw;
            unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
            if (done[l] || lh != bh || lw != bw) continue;
            heads_total += hd;
            for (int b = 0; b < B; b++)
                for (int k = 0; k < hd; k++)
                    for (size_t i = 0; i < P; i++)
                        for (int j = 0; j < 2; j++)
                            A[(size_t)j * n + (size_t)b * P + i] += t->probe[l][(((size_t)b * hd + k) * P + i) * 2 + j];
        }
        for (size_t i = 0; i < 2 * n; i++) A[i] /= heads_total;
        for (int b = 0; b < B; b++)
            for (int y = 0; y < bh; y++)
                for (int x = 0; x < bw; x++)
                    gt[(size_t)b * P + (size_t)y * bw + x] =
                        masks[((size_t)b * mh + train_nearest(y, mh, bh)) * mw + train_nearest(x, mw, bw)];
        double group = 0.0;
        for (int j = 0; j < 2; j++) {                   /* 0: adjective (first word), 1: subject */
            const double *a = A + (size_t)j * n;
            double *G = dA + (size_t)j * n, amax = -HUGE_VAL, dot = 0.0;
            int nmax = 0;
            size_t ns = 0;
            for (size_t i = 0; i < n; i++) amax = a[i] > amax ? a[i] : amax;
            for (size_t i = 0; i < n; i++) nmax += a[i] == amax;
            if (j == 1 && t->cfg.reg_full_identity) {   /* F.mse_loss(sub, gt) */
                double sum = 0.0;
                for (size_t i = 0; i < n; i++) { double d = a[i] / amax - gt[i]; sum += d * d; G[i] = 2.0 * d / n; }
                group += sum / n;
            } else {                                      /* map[gt == 0].mean() */
                double sum = 0.0;
                for (size_t i = 0; i < n; i++) if (gt[i] == 0.0) { sum += a[i] / amax; ns++; }
                if (!ns) nan = 1;
                for (size_t i = 0; i < n; i++) G[i] = gt[i] == 0.0 && ns ? 1.0 / ns : 0.0;
                group += ns ? sum / ns : NAN;
            }
            for (size_t i = 0; i < n; i++) dot += G[i] * a[i];
            for (size_t i = 0; i < n; i++) {
                G[i] = G[i] / amax;
                if (a[i] == amax) G[i] -= dot / (amax * amax) / nmax;
                G[i] *= wgt / heads_total;
            }
        }
        total += wgt * group;
        for (int l = 0; l < t->n_cross; l++) {
            int hd, lh, lw;
            unet_probe_shape_cfg(uc, t->h, t->w, l, &hd, &lh, &lw);
            if (done[l] || lh != bh || lw != bw) continue;
            done[l] = 1;
            if (want_grad)
                for (int b = 0; b < B; b++)
                    for (int k = 0; k < hd; k++)
                        for (size_t i = 0; i < P; i++)
                            for (int j = 0; j < 2; j++)
                                t->dprobe[l][(((size_t)b * hd + k) * P + i) * 2 + j] =
                                    (float)dA[(size_t)j * n + (size_t)b * P + i];
        }
        free(A);
    }
    return nan ? NAN : total;
}

static int train_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) if (!(x[i] - x[i] == 0.0f)) return 0;
    return 1;
}

/* Steps 1-8: the loss of one batch and, with want_grad, the gradients of every trainable tensor
 * (the parameters do not move). */
MsStatus ms_trainer_loss(MsTrainer *t, const MsTrainBatch *bt, const MsStepDraws *dr, MsTorchRng *g,
                         MsStepReport *rep, int want_grad) {
    const MsTrainConfig *c = &t->cfg;
    const UNetConfig *uc = &t->model->unet_config;
    const ClipTextConfig *tc = &t->model->text_config;
    const int B = t->B, L = t->L, Lc = c->enable_edlora ? t->n_cross : 1;
    const int Cl = uc->in_channels, h = t->h, w = t->w;
    const size_t nlat = (size_t)B * Cl * h * w, M = (size_t)h * w;
    const int64_t k = t->step + 1;
    float tf[64];
    int64_t ts[64];
    MsStatus s;
    memset(rep, 0, sizeof *rep);
    if (bt->B != B || bt->H != t->H || bt->W != t->W)
        return ms_errorf(MS_ERR_SHAPE, "train step %lld: batch %d x %d x %d, trainer planned %d x %d x %d",
                         (long long)k, bt->B, bt->W, bt->H, B, t->W, t->H);
    if (!dr && !g) return ms_errorf(MS_ERR_ARG, "train step %lld: neither draws nor a generator", (long long)k);
    if (uc->in_channels != t->model->vae_config.latent_channels)
        return ms_errorf(MS_ERR_SHAPE, "train: UNet in_channels %d != VAE latent_channels %d", uc->in_channels,
                         t->model->vae_config.latent_channels);

    /* 1. latents = vae.encode(images).latent_dist.sample() * 0.18215 */
    if ((s = vae_encode(&t->vp, &t->vae_ar, t->mean, t->logvar, bt->images, B, t->H, t->W))) return s;
    if (dr) memcpy(t->noise, dr->vae_eps, nlat * sizeof(float));
    else ms_torch_randn(g, t->noise, nlat, MS_TORCH_CPU_AVX2);
    vae_posterior_sample(t->lat, NULL, t->mean, t->logvar, t->noise, nlat, TRAIN_VAE_SCALE);
    /* 2. noise (+ offset) */
    if (dr) memcpy(t->noise, dr->noise_randn, nlat * sizeof(float));
    else ms_torch_randn(g, t->noise, nlat, MS_TORCH_CPU_AVX2);
    if (c->has_noise_offset) {
        float off[256];
        if (B * Cl > 256) return ms_errorf(MS_ERR_ARG, "train: batch x channels %d > 256", B * Cl);
        if (dr) memcpy(off, dr->noise_offset_randn, (size_t)B * Cl * sizeof(float));
        else ms_torch_randn(g, off, (size_t)B * Cl, MS_TORCH_CPU_AVX2);
        for (int i = 0; i < B * Cl; i++) {
            float o = (float)c->noise_offset * off[i];
            for (size_t m = 0; m < M; m++) t->noise[(size_t)i * M + m] = t->noise[(size_t)i * M + m] + o;
        }
    }
    /* 3. timesteps, noisy latents */
    for (int b = 0; b < B; b++) {
        ts[b] = dr ? dr->timesteps[b] : (int64_t)(ms_torch_random(g) % (uint32_t)t->sch->T);
        tf[b] = (float)ts[b];
    }
    if ((s = ms_scheduler_add_noise(t->sch, t->noisy, t->lat, t->noise, ts, B, (size_t)Cl * M))) return s;

    /* 4. bound prompts -> ids (B*L, 77), sample-major */
    for (int b = 0; b < B; b++)
        for (int i = 0; i < L; i++) {
            int32_t *row = t->ids + ((size_t)b * L + i) * TRAIN_T;
            if (dr && dr->input_ids) { memcpy(row, dr->input_ids + ((size_t)b * L + i) * TRAIN_T, TRAIN_T * sizeof(int32_t)); continue; }
            char bound[2048];
            if (c->enable_edlora) { if ((s = train_bind(bound, sizeof bound, bt->prompts[b], c, L, i))) return s; }
            else snprintf(bound, sizeof bound, "%s", bt->prompts[b]);
            if ((s = clip_tokenize(t->tok, bound, strlen(bound), row, TRAIN_T))) return s;
        }
    /* 5. text encoder, then the layer contexts c[:, i] */
    if ((s = clip_text_forward(&t->ta, &t->tp, t->te_on ? &t->te_lora : NULL, t->ids, t->emb, t->n_tok, tc))) return s;
    for (int i = 0; i < Lc; i++)
        for (int b = 0; b < B; b++)
            memcpy(t->ctx[i] + (size_t)b * TRAIN_T * t->D, t->ta.out + ((size_t)b * L + (c->enable_edlora ? i : 0)) * TRAIN_T * t->D,
                   (size_t)TRAIN_T * t->D * sizeof(float));
    /* attention-regulariser probes: the concept token positions of each sample's first prompt */
    if (t->attn_reg) {
        for (int b = 0; b < B; b++) {
            const int32_t *row = t->ids + (size_t)b * L * TRAIN_T;
            int n = 0;
            for (int j = 0; j < TRAIN_T && n < 2; j++)
                if (row[j] >= t->first_id && row[j] < t->first_id + t->n_tok) t->cols[2 * b + n++] = j;
            if (n < 2)
                return ms_errorf(MS_ERR_ARG, "train step %lld: prompt of sample %d has %d concept tokens; the "
                                 "attention regulariser needs the two words (\"%s\")", (long long)k, b, n, bt->prompts[b]);
        }
        t->ua.probe_ncol = 2;
        t->ua.probe_cols = t->cols;
        t->ua.probe = t->probe;
        t->ua.dprobe = (const float *const *)t->dprobe;
    } else t->ua.probe_ncol = 0;

    /* 6. UNet */
    if ((s = unet_forward(t->pred, &t->ua, t->noisy, tf, c->enable_edlora ? NULL : t->ctx[0],
                          c->enable_edlora ? (const float *const *)t->ctx : NULL, NULL, &t->up,
                          t->u_on ? &t->u_lora : NULL))) return s;

    /* 7. losses */
    {
        const double *mask = c->use_mask_loss ? (bt->masks ? bt->masks : bt->img_masks) : bt->img_masks;
        rep->loss_mse = train_masked_mse(t->dpred, t->pred, t->noise, mask, B, uc->out_channels, (int)M);
        rep->loss = rep->loss_mse;
        rep->loss_attn = NAN;
        if (t->attn_reg) {
            rep->loss_attn = train_attn_reg(t, bt->masks ? bt->masks : bt->img_masks, 1);
            if (rep->loss_attn == rep->loss_attn) rep->loss += rep->loss_attn;
            else t->ua.probe_ncol = 0;                          /* left out: no gradient either */
        }
        rep->model_pred = t->pred;
        if (!(rep->loss_mse - rep->loss_mse == 0.0))
            return ms_errorf(MS_ERR_FORMAT, "train step %lld: the epsilon loss is not finite (%g)", (long long)k, rep->loss_mse);
    }

    if (!want_grad) return MS_OK;
    /* 8. backward: UNet -> layer contexts -> text encoder -> LoRA and concept rows */
    for (int i = 0; i < t->n_par; i++) memset(t->par[i].grad, 0, t->par[i].n * sizeof(float));
    for (int i = 0; i < Lc; i++) memset(t->dctx[i], 0, (size_t)B * TRAIN_T * t->D * sizeof(float));
    if ((s = unet_backward(&t->ua, &t->up, t->u_on ? &t->u_lora : NULL, t->u_on ? &t->u_grad : NULL, t->dpred,
                           c->enable_edlora ? NULL : t->dctx[0], c->enable_edlora ? (float *const *)t->dctx : NULL)))
        return s;
    if (t->te_on || c->tune_emb) {
        memset(t->hid_d, 0, (size_t)B * L * TRAIN_T * t->D * sizeof(float));
        for (int i = 0; i < Lc; i++)
            for (int b = 0; b < B; b++) {
                float *dst = t->hid_d + ((size_t)b * L + (c->enable_edlora ? i : 0)) * TRAIN_T * t->D;
                const float *src = t->dctx[i] + (size_t)b * TRAIN_T * t->D;
                for (size_t j = 0; j < (size_t)TRAIN_T * t->D; j++) dst[j] += src[j];
            }
        clip_text_backward(t->te_on ? &t->te_grad : NULL, c->tune_emb ? t->demb : NULL, t->hid_d, &t->ta, &t->tp,
                           t->te_on ? &t->te_lora : NULL, t->ids, t->n_tok, tc);
    }
    for (int i = 0; i < t->n_par; i++)
        if (!train_finite(t->par[i].grad, t->par[i].n))
            return ms_errorf(MS_ERR_FORMAT, "train step %lld: gradient of %s is not finite (loss %g = mse %g + attn %g)",
                             (long long)k, t->par[i].name, rep->loss, rep->loss_mse, rep->loss_attn);
    return MS_OK;
}

MsStatus ms_trainer_step(MsTrainer *t, const MsTrainBatch *bt, const MsStepDraws *dr, MsTorchRng *g,
                         MsStepReport *rep) {
    const MsTrainConfig *c = &t->cfg;
    const int64_t k = t->step + 1;
    MsStatus s = ms_trainer_loss(t, bt, dr, g, rep, 1);
    if (s) return s;

    /* 9. AdamW, linear decay; embedding rows stay frozen once stop_emb_update is set */
    {
        const double base[3] = { c->lr_emb, c->lr_te, c->lr_unet };
        const int on[3] = { c->tune_emb, t->te_on, t->u_on };
        for (int gi = 0; gi < 3; gi++) rep->lr[gi] = train_lr(t, base[gi], k);
        for (int i = 0; i < t->n_par; i++) {
            TrainParam *p = &t->par[i];
            if (!on[p->group]) continue;
            double wd = p->group == 0 && c->wd_emb == c->wd_emb ? c->wd_emb : c->weight_decay;
            ms_adamw_step(p->data, p->grad, p->m, p->v, p->n, k, rep->lr[p->group], wd, c->beta1, c->beta2, c->adam_eps);
        }
        if (t->stop_emb) memcpy(t->emb, t->emb_frozen, (size_t)t->n_tok * t->D * sizeof(float));
        for (int i = 0; i < t->n_par; i++)
            if (!train_finite(t->par[i].data, t->par[i].n))
                return ms_errorf(MS_ERR_FORMAT, "train step %lld: %s is not finite after the update", (long long)k, t->par[i].name);
    }
    /* Norm_mean and the freeze (train_edlora.py, after the step) */
    {
        double sum = 0.0;
        for (int i = 0; i < t->n_tok; i++) {
            double q = 0.0;
            for (int d = 0; d < t->D; d++) { double x = t->emb[(size_t)i * t->D + d]; q += x * x; }
            sum += (float)sqrt(q);
        }
        rep->emb_norm_mean = (float)(sum / t->n_tok);
        if (!t->stop_emb && rep->emb_norm_mean >= c->emb_norm_threshold) {
            t->stop_emb = 1;
            memcpy(t->emb_frozen, t->emb, (size_t)t->n_tok * t->D * sizeof(float));
        }
        rep->emb_frozen = t->stop_emb;
    }
    t->step = k;
    return MS_OK;
}

/* ---- text-to-image pipeline ---- */
/* diffusers 0.19.3 StableDiffusionPipeline.__call__ (pipeline_stable_diffusion.py) and
 * StableDiffusionAdapterPipeline.__call__ (t2i_adapter/pipeline_stable_diffusion_adapter.py),
 * step for step:
 *   0. height/width default to unet.sample_size * 8 (the caller fills them in).
 *   3. _encode_prompt: ids = tokenizer(prompt, padding "max_length" 77, truncation) -> text
 *      encoder last_hidden_state; with CFG (guidance_scale > 1) the negative prompt (or "")
 *      the same way; each repeated num_images_per_prompt times; context = [uncond, cond].
 *   4. scheduler.set_timesteps(steps).
 *   5. latents = randn((B, 4, H/8, W/8), generator = torch.Generator().manual_seed(seed))
 *      * init_noise_sigma  (one randn call for the whole batch, on the CPU).
 *   7. adapter: state_k = adapter(cond)_k * adapter_conditioning_scale, repeated to B and
 *      doubled for CFG, added to the UNet's down blocks.
 *      for each t: in = scale_model_input(cat([latents] * 2), t); eps = unet(in, t, context);
 *        eps = eps_uncond + guidance_scale * (eps_text - eps_uncond);
 *        latents = scheduler.step(eps, t, latents, generator)   (DDPM/Euler draw noise from
 *        the same generator, after the initial latents).
 *   decode(latents / scaling_factor); postprocess: ms_image_to_u8. */

void ms_image_to_u8(uint8_t *out, const float *img, int C, int H, int W) {
    const size_t HW = (size_t)H * W;
    for (int c = 0; c < C; c++)
        for (size_t p = 0; p < HW; p++) {
            float v = img[(size_t)c * HW + p] / 2.0f + 0.5f;     /* denormalize: (x / 2 + 0.5) */
            v = v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v;           /* .clamp(0, 1) (NaN stays NaN) */
            v = v * 255.0f;                                      /* numpy float32 */
            out[p * C + c] = v == v ? (uint8_t)nearbyintf(v) : 0;   /* .round(): half to even */
        }
}

/* Encodes one prompt (B rows of the same ids) into ctx (B, T, D); new_emb (n_new, D): the rows
 * of added tokens (NULL, 0: none). */
static MsStatus encode_prompt(const ClipTextParams *p, const ClipTextConfig *c, const ClipTokenizer *tok,
                              const char *text, float *ctx, int B, Arena *ar, const float *new_emb, int n_new) {
    int32_t ids[77];
    const int T = 77;
    size_t mark = arena_mark(ar);
    ClipTextActs a;
    MsStatus s = clip_tokenize(tok, text, strlen(text), ids, T);
    if (s) return s;
    if ((s = clip_text_acts_alloc(&a, ar, c, 1, T, 0, 0))) return s;
    if ((s = clip_text_forward(&a, p, NULL, ids, new_emb, n_new, c))) { arena_reset(ar, mark); return s; }
    for (int b = 0; b < B; b++) memcpy(ctx + (size_t)b * T * c->hidden_size, a.out, (size_t)T * c->hidden_size * sizeof(float));
    arena_reset(ar, mark);
    return MS_OK;
}

/* Mix-of-Show pipeline_edlora.py bind_concept_prompt for layer i: starting from the prompt,
 * for each concept word in order, str.replace(word, its i-th token) (every occurrence, left to
 * right, not rescanning what was inserted). Returns a malloc'ed string or NULL (out of memory). */
static char *bind_prompt(const char *prompt, int n_words, const char *const *word, const char *const *token,
                         int n_layers, int i) {
    size_t len = strlen(prompt);
    char *cur = (char *)malloc(len + 1);
    if (!cur) return NULL;
    memcpy(cur, prompt, len + 1);
    for (int w = 0; w < n_words; w++) {
        const char *from = word[w], *to = token[(size_t)w * n_layers + i], *q;
        size_t fl = strlen(from), tl = strlen(to), n = 0;
        if (!fl) continue;                      /* str.replace('', x) would insert everywhere: words are never empty */
        for (q = strstr(cur, from); q; q = strstr(q + fl, from)) n++;
        if (!n) continue;
        size_t cap = strlen(cur) - n * fl + n * tl + 1;
        char *out = (char *)malloc(cap), *o = out;
        const char *r = cur;
        if (!out) { free(cur); return NULL; }
        for (; (q = strstr(r, from)) != NULL; r = q + fl) {
            memcpy(o, r, (size_t)(q - r)); o += q - r;
            memcpy(o, to, tl); o += tl;
        }
        strcpy(o, r);                           /* the rest after the last occurrence */
        free(cur);
        cur = out;
    }
    return cur;
}

MsStatus ms_txt2img(const MsModel *m, const ClipTokenizer *tok, const MsTxt2ImgOptions *o, float *image) {
    const UNetConfig *uc = &m->unet_config;
    const VaeConfig *vc = &m->vae_config;
    const ClipTextConfig *tc = &m->text_config;
    const int f = 1 << (vc->n_blocks - 1), B = o->batch, T = 77, D = tc->hidden_size;
    const int cfg_on = o->guidance_scale > 1.0f, NB = cfg_on ? 2 * B : B;
    MsStatus s;
    if (B < 1 || B > 64) return ms_errorf(MS_ERR_ARG, "txt2img: batch %d (expected 1..64)", B);
    if (o->width <= 0 || o->height <= 0 || o->width % f || o->height % f || o->width > 8192 || o->height > 8192)
        return ms_errorf(MS_ERR_ARG, "txt2img: size %d x %d: sides must be positive multiples of %d (at most 8192)",
                         o->width, o->height, f);
    if (o->steps < 1 || o->steps > MS_SCHED_MAX_T) return ms_errorf(MS_ERR_ARG, "txt2img: %d steps (expected 1..%d)", o->steps, MS_SCHED_MAX_T);
    if (uc->cross_attention_dim != D)
        return ms_errorf(MS_ERR_ARG, "txt2img: UNet cross_attention_dim %d != text hidden_size %d", uc->cross_attention_dim, D);
    const int n_lc = o->n_layer_ctx, n_ctx = n_lc ? n_lc : 1;   /* ED-LoRA: one context per cross-attention layer */
    if (n_lc && n_lc != ms_unet_cross_attn_layers(uc))
        return ms_errorf(MS_ERR_ARG, "txt2img: %d layer-wise contexts, the UNet has %d cross-attention layers",
                         n_lc, ms_unet_cross_attn_layers(uc));
    if (o->n_new < 0 || (o->n_new && !o->new_emb) || o->n_bind < 0 || (o->n_bind && (!n_lc || !o->bind_word || !o->bind_token)))
        return ms_errorf(MS_ERR_ARG, "txt2img: ED-LoRA options: %d new rows%s, %d words to bind%s", o->n_new,
                         o->n_new && !o->new_emb ? " without data" : "", o->n_bind,
                         o->n_bind && !n_lc ? " without layer-wise contexts" : "");
    const int h = o->height / f, w = o->width / f, L = uc->in_channels;
    const size_t nl = (size_t)B * L * h * w;            /* one latent batch */
    MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
    ClipTextParams *tp = (ClipTextParams *)malloc(sizeof *tp);
    VaeParams *vp = (VaeParams *)malloc(sizeof *vp);
    UNetParams *up = (UNetParams *)malloc(sizeof *up);
    MsTorchRng *rng = (MsTorchRng *)malloc(sizeof *rng);
    Arena ar = { 0 }, acts = { 0 };
    UNetActs ua;
    int ua_ok = 0, up_ok = 0;
    float *lat = NULL, *in = NULL, *eps = NULL, *work = NULL, *ctx = NULL, *feat[MS_MAX_BLOCKS] = { 0 };
    const float **lctx = NULL;                          /* n_lc pointers into ctx (ED-LoRA) */
    size_t nfeat[MS_MAX_BLOCKS] = { 0 };
    int n_feat = 0;
    if (!sch || !tp || !vp || !up || !rng) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }
    if ((s = ms_scheduler_init(sch, o->sampler, &m->scheduler_config, o->torch_cpu))) goto done;
    if ((s = ms_scheduler_set_timesteps(sch, o->steps))) goto done;
    if ((s = clip_text_params(tp, &m->text, tc))) goto done;
    if ((s = vae_params_init(vp, vc, &m->vae))) goto done;
    if ((s = unet_params_init(up, uc, &m->unet))) goto done;
    up_ok = 1;

    /* plan: one scratch arena for the largest of text encoder, adapter, UNet and VAE decode */
    {
        VaeSizes vz;
        size_t need = clip_text_sizes(tc, 1, T, 0, 0), u = 0;
        if ((s = vae_sizes(vc, o->height, o->width, -1, &vz))) goto done;
        if (vz.decode_bytes > need) need = vz.decode_bytes;
        UNetSizes us;
        if ((s = unet_sizes(uc, NB, h, w, T, 0, &us))) goto done;
        u = us.scratch_bytes;
        if (u > need) need = u;
        if (o->adapter) {
            size_t ab;
            if ((s = adapter_sizes(&o->adapter->cfg, 1, o->height, o->width, &ab, nfeat))) goto done;
            if (ab > need) need = ab;
            n_feat = o->adapter->cfg.n_channels;
        }
        if ((s = arena_init(&ar, need)) || (s = arena_init(&acts, us.acts_bytes))) goto done;
    }
    lat = (float *)ms_alloc_aligned(nl, sizeof(float));
    in = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    eps = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    work = (float *)ms_alloc_aligned(nl, sizeof(float));
    ctx = (float *)ms_alloc_aligned((size_t)n_ctx * NB * T * D, sizeof(float));
    if (n_lc) lctx = (const float **)malloc((size_t)n_lc * sizeof *lctx);
    if (!lat || !in || !eps || !work || !ctx || (n_lc && !lctx)) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }

    /* 3. context = [uncond x B, cond x B]. ED-LoRA (EDLoRAPipeline._encode_prompt): context i
     * (layer i) = [uncond x B, encode(bind_concept_prompt(prompt)[i]) x B]; the negative prompt
     * is encoded once, unbound, and repeated for every layer. */
    if (cfg_on && (s = encode_prompt(tp, tc, tok, o->negative ? o->negative : "", ctx, B, &ar, o->new_emb, o->n_new))) goto done;
    if (!n_lc) {
        if ((s = encode_prompt(tp, tc, tok, o->prompt, ctx + (cfg_on ? (size_t)B * T * D : 0), B, &ar, o->new_emb, o->n_new)))
            goto done;
    } else {
        for (int i = 0; i < n_lc; i++) {
            float *ci = ctx + (size_t)i * NB * T * D;
            char *bound = bind_prompt(o->prompt, o->n_bind, o->bind_word, o->bind_token, n_lc, i);
            if (!bound) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }
            if (cfg_on && i) memcpy(ci, ctx, (size_t)B * T * D * sizeof(float));
            s = encode_prompt(tp, tc, tok, bound, ci + (cfg_on ? (size_t)B * T * D : 0), B, &ar, o->new_emb, o->n_new);
            free(bound);
            if (s) goto done;
            lctx[i] = ci;
        }
    }

    /* 5. initial latents */
    ms_torch_seed(rng, o->seed);
    if (o->init_noise) memcpy(lat, o->init_noise, nl * sizeof(float));
    else ms_torch_randn(rng, lat, nl, o->torch_cpu);
    for (size_t k = 0; k < nl; k++) lat[k] = lat[k] * sch->init_noise_sigma;

    /* 7. adapter state: features * scale, repeated to NB samples */
    if (o->adapter) {
        float *one[MS_MAX_BLOCKS];
        for (int i = 0; i < n_feat; i++) {
            feat[i] = (float *)ms_alloc_aligned(nfeat[i] * NB, sizeof(float));
            if (!feat[i]) { s = ms_errorf(MS_ERR_NOMEM, "txt2img: out of memory"); goto done; }
            one[i] = feat[i];
        }
        if ((s = adapter_forward(o->adapter, &ar, one, o->cond, 1, o->height, o->width))) goto done;
        for (int i = 0; i < n_feat; i++) {
            for (size_t k = 0; k < nfeat[i]; k++) feat[i][k] = feat[i][k] * o->adapter_scale;
            for (int b = 1; b < NB; b++) memcpy(feat[i] + (size_t)b * nfeat[i], feat[i], nfeat[i] * sizeof(float));
        }
        arena_reset(&ar, 0);
    }

    /* 7. denoising loop */
    if ((s = unet_acts_init(&ua, uc, NB, h, w, T, 0, &acts, &ar))) goto done;
    ua_ok = 1;
    for (int i = 0; i < sch->num_steps; i++) {
        float t[128];
        for (int b = 0; b < NB; b++) t[b] = (float)sch->timesteps[i];
        ms_scheduler_scale_model_input(sch, i, in, lat, nl);
        if (cfg_on) memcpy(in + nl, in, nl * sizeof(float));
        if ((s = unet_forward(eps, &ua, in, t, n_lc ? NULL : ctx, (const float *const *)lctx,
                              o->adapter ? (const float *const *)feat : NULL, up, NULL)))
            goto done;
        if (cfg_on) {
            const float g = o->guidance_scale;
            for (size_t k = 0; k < nl; k++) eps[k] = eps[k] + g * (eps[nl + k] - eps[k]);
        }
        if ((s = ms_scheduler_step(sch, i, eps, lat, work, nl, rng))) goto done;
        if (o->progress) o->progress(o->progress_ctx, i, sch->num_steps, lat, nl);
    }

    /* decode(latents / scaling_factor) */
    unet_acts_free(&ua);
    ua_ok = 0;
    /* the UNet is done: give its activations, weight staging and the kernels' per-thread
     * workspaces back before the VAE decode, the peak of a 512x512 run */
    arena_free(&acts);
    if (up_ok) { unet_params_free(up); up_ok = 0; }
    ms_gemm_scratch_free();
    ops_scratch_free();
    ms_free_aligned(in); ms_free_aligned(eps); ms_free_aligned(ctx);
    in = eps = ctx = NULL;
    free(lctx);
    lctx = NULL;
    arena_reset(&ar, 0);
    s = vae_decode(vp, &ar, image, lat, B, h, w);
done:
    for (int i = 0; i < MS_MAX_BLOCKS; i++) ms_free_aligned(feat[i]);
    ms_free_aligned(lat); ms_free_aligned(in); ms_free_aligned(eps); ms_free_aligned(work); ms_free_aligned(ctx);
    free(lctx);
    if (ua_ok) unet_acts_free(&ua);
    if (up_ok) unet_params_free(up);
    arena_free(&ar);
    arena_free(&acts);
    free(sch); free(tp); free(vp); free(up); free(rng);
    return s;
}
