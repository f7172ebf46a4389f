/* mixshow.c — the method of Mix-of-Show (Gu et al., NeurIPS 2023, arXiv:2305.18292v2), in
 * sections:
 *   ED-LoRA step + AdamW        (single-client tuning; issue: ED-LoRA training)
 *   gradient fusion + L-BFGS    (center node; issue: gradient fusion)
 *   regionally controllable sampling
 *   text-to-image pipeline      (diffusers StableDiffusion(Adapter)Pipeline: `mixshow sample`)
 * Only the text-to-image pipeline is written so far. */
#include "mixshow.h"

#include <math.h>
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
