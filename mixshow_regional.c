/* mixshow_regional.c — regionally controllable sampling (Mix-of-Show, arXiv:2305.18292v2,
 * Sec. 3.4 "Regionally Controllable Sampling"; official code, commit 51270fd:
 * mixofshow/pipelines/pipeline_regionally_t2iadapter.py RegionallyT2IAdapterPipeline and
 * regionally_controlable_sampling.py). To be folded into mixshow.c as its own section.
 *
 * The algorithm, as the official pipeline runs it:
 *   1. prompts: the global prompt is bound x16 (bind_concept_prompt: layer i replaces every
 *      concept word by its i-th token) and encoded per layer; the negative prompt is encoded
 *      once, unbound, for every layer: context_i = [neg, pos_i]. Each region the same with its
 *      own prompt and negative prompt: region_i = [rneg, rpos_i].
 *   2. latents = randn(1,4,h,w) (torch.Generator().manual_seed(seed)) * init_noise_sigma.
 *   3. adapters: for every level k, state_k = keypose_k * W_k + sketch_k * S_k, where W_k is the
 *      spatial weight map (the global weight, a region's weight inside its box); the same state
 *      for both CFG halves.
 *   4. for each timestep: eps = UNet([x, x], t, contexts, regions, state) with the regional
 *      attention of UNetRegions in every attn2 (global attention outside the boxes, per-region
 *      attention inside, averaged where boxes overlap); eps = eps_u + g (eps_c - eps_u);
 *      x = scheduler.step(eps, t, x).
 *   5. image = vae.decode(x / scaling_factor).
 * The official pipeline crashes when per-region adapter weights are given (the parsed weight
 * strings overwrite the variable that holds the encoded region prompts); here they work as the
 * paper describes (tests/test_regional.c checks the three properties of the issue). */
#include "mixshow.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* bind_concept_prompt for layer i (the same as mixshow.c's bind_prompt; str.replace per word). */
static char *rs_bind(const char *prompt, int n_words, const char *const *word, const char *const *token,
                     int n_layers, int i) {
    size_t len = strlen(prompt);
    char *cur = (char *)malloc(len + 1);
    if (!cur) return NULL;
    memcpy(cur, prompt, len + 1);
    for (int w = 0; w < n_words; w++) {
        const char *from = word[w], *to = token[(size_t)w * n_layers + i], *q;
        size_t fl = strlen(from), tl = strlen(to), n = 0;
        if (!fl) continue;
        for (q = strstr(cur, from); q; q = strstr(q + fl, from)) n++;
        if (!n) continue;
        char *out = (char *)malloc(strlen(cur) - n * fl + n * tl + 1), *o = out;
        const char *r = cur;
        if (!out) { free(cur); return NULL; }
        for (; (q = strstr(r, from)) != NULL; r = q + fl) {
            memcpy(o, r, (size_t)(q - r)); o += q - r;
            memcpy(o, to, tl); o += tl;
        }
        strcpy(o, r);
        free(cur);
        cur = out;
    }
    return cur;
}

/* text -> out (77, D) = CLIPTextModel(tokenizer(text)).last_hidden_state */
static MsStatus rs_encode(const ClipTextParams *p, const ClipTextConfig *c, const ClipTokenizer *tok,
                          const char *text, float *out, Arena *ar, const float *new_emb, int n_new) {
    int32_t ids[77];
    size_t mark = arena_mark(ar);
    ClipTextActs a;
    MsStatus s = clip_tokenize(tok, text, strlen(text), ids, 77);
    if (s) return s;
    if ((s = clip_text_acts_alloc(&a, ar, c, 1, 77, 0, 0))) return s;
    s = clip_text_forward(&a, p, NULL, ids, new_emb, n_new, c);
    if (!s) memcpy(out, a.out, (size_t)77 * c->hidden_size * sizeof(float));
    arena_reset(ar, mark);
    return s;
}

/* One (negative, positive) pair for n_ctx layers: out (n_ctx, 2, 77, D) = [neg, bound pos_i]. */
static MsStatus rs_encode_pair(const ClipTextParams *tp, const ClipTextConfig *tc, const ClipTokenizer *tok,
                               const MsTxt2ImgOptions *b, const char *pos, const char *neg, int n_ctx, float *out,
                               Arena *ar) {
    const size_t one = (size_t)77 * tc->hidden_size;
    MsStatus s = rs_encode(tp, tc, tok, neg ? neg : "", out, ar, b->new_emb, b->n_new);
    for (int i = 0; !s && i < n_ctx; i++) {
        float *ci = out + (size_t)i * 2 * one;
        if (i) memcpy(ci, out, one * sizeof(float));            /* negative: encoded once, repeated */
        if (b->n_layer_ctx && b->n_bind) {
            char *bound = rs_bind(pos, b->n_bind, b->bind_word, b->bind_token, b->n_layer_ctx, i);
            if (!bound) return ms_errorf(MS_ERR_NOMEM, "regional: out of memory");
            s = rs_encode(tp, tc, tok, bound, ci + one, ar, b->new_emb, b->n_new);
            free(bound);
        } else if (i == 0) {
            s = rs_encode(tp, tc, tok, pos, ci + one, ar, b->new_emb, b->n_new);
        } else {
            memcpy(ci + one, out + one, one * sizeof(float));   /* nothing to bind: every layer alike */
        }
    }
    return s;
}

void ms_regional_weight_map(float *map, int fh, int fw, int height, int width, const MsRegionalAdapter *a) {
    for (size_t k = 0; k < (size_t)fh * fw; k++) map[k] = a->weight;  /* weight * torch.ones(fh, fw) */
    for (int r = 0; r < a->n_box; r++) {
        /* start_h, end_h = start_h / height, end_h / height (likewise w), then ceil / floor */
        double f[4] = { a->box[r][0] / height, a->box[r][1] / width, a->box[r][2] / height, a->box[r][3] / width };
        int r0, c0, r1, c1;
        unet_region_rows(f, fh, fw, &r0, &c0, &r1, &c1);
        for (int y = r0; y < r1; y++)
            for (int x = c0; x < c1; x++) map[(size_t)y * fw + x] = a->box_weight[r];
    }
}

static MsStatus rs_check_adapter(const MsRegionalAdapter *a, const char *name, int want_cin, const UNetConfig *uc) {
    if (!a->adapter) return MS_OK;
    const AdapterConfig *ac = &a->adapter->cfg;
    if (!a->cond) return ms_errorf(MS_ERR_ARG, "regional: %s adapter without a condition image", name);
    if (ac->in_channels != want_cin)
        return ms_errorf(MS_ERR_ARG, "regional: the %s adapter takes %d input channel(s); a %s condition has %d "
                         "(the official script reads it as %s)", name, ac->in_channels, name, want_cin,
                         want_cin == 3 ? "RGB" : "grey (L)");
    if (ac->n_channels != uc->n_blocks)
        return ms_errorf(MS_ERR_ARG, "regional: the %s adapter has %d feature levels, the UNet %d", name, ac->n_channels,
                         uc->n_blocks);
    for (int i = 0; i < ac->n_channels; i++)
        if (ac->channels[i] != uc->block_out_channels[i])
            return ms_errorf(MS_ERR_ARG, "regional: %s adapter level %d has %d channels, the UNet block %d", name, i,
                             ac->channels[i], uc->block_out_channels[i]);
    if (!(a->weight == a->weight)) return ms_errorf(MS_ERR_ARG, "regional: %s adapter weight is NaN", name);
    for (int r = 0; r < a->n_box; r++)
        if (!a->box || !a->box_weight)
            return ms_errorf(MS_ERR_ARG, "regional: %s adapter: %d region weights without data", name, a->n_box);
    return MS_OK;
}

MsStatus ms_regional_sample(const MsModel *m, const ClipTokenizer *tok, const MsRegionalOptions *o, float *image) {
    const MsTxt2ImgOptions *b = &o->base;
    const UNetConfig *uc = &m->unet_config;
    const VaeConfig *vc = &m->vae_config;
    const ClipTextConfig *tc = &m->text_config;
    const int f = 1 << (vc->n_blocks - 1), T = 77, D = tc->hidden_size, NB = 2, R = o->n_regions;
    const int n_cross = ms_unet_cross_attn_layers(uc);
    MsStatus s;
    if (b->batch != 1) return ms_errorf(MS_ERR_ARG, "regional: batch %d (the official pipeline samples one image)", b->batch);
    if (!(b->guidance_scale > 1.0f))
        return ms_errorf(MS_ERR_ARG, "regional: guidance scale %g: must be > 1 (the pipeline always builds both halves)",
                         (double)b->guidance_scale);
    if (!b->prompt) return ms_errorf(MS_ERR_ARG, "regional: no prompt");
    if (b->width <= 0 || b->height <= 0 || b->width % f || b->height % f || b->width > 8192 || b->height > 8192)
        return ms_errorf(MS_ERR_ARG, "regional: size %d x %d: sides must be positive multiples of %d", b->width,
                         b->height, f);
    if (b->steps < 1 || b->steps > MS_SCHED_MAX_T) return ms_errorf(MS_ERR_ARG, "regional: %d steps", b->steps);
    if (uc->cross_attention_dim != D)
        return ms_errorf(MS_ERR_ARG, "regional: UNet cross_attention_dim %d != text hidden_size %d", uc->cross_attention_dim, D);
    if (b->n_layer_ctx && b->n_layer_ctx != n_cross)
        return ms_errorf(MS_ERR_ARG, "regional: %d layer-wise contexts, the UNet has %d cross-attention layers",
                         b->n_layer_ctx, n_cross);
    if (b->n_bind && (!b->n_layer_ctx || !b->bind_word || !b->bind_token))
        return ms_errorf(MS_ERR_ARG, "regional: %d concept words to bind without layer-wise contexts", b->n_bind);
    if (R < 0 || R > MS_REGION_MAX || (R && !o->regions))
        return ms_errorf(MS_ERR_ARG, "regional: %d regions (expected 0..%d)", R, MS_REGION_MAX);
    for (int r = 0; r < R; r++) {
        const double *bx = o->regions[r].box;
        if (!o->regions[r].prompt) return ms_errorf(MS_ERR_ARG, "regional: region %d has no prompt", r + 1);
        if (!(bx[0] >= 0 && bx[1] >= 0 && bx[2] <= 1 && bx[3] <= 1 && bx[0] < bx[2] && bx[1] < bx[3]))
            return ms_errorf(MS_ERR_ARG, "regional: region %d box [%g, %g, %g, %g] (fractions top, left, bottom, right): "
                             "expected 0 <= top < bottom <= 1 and 0 <= left < right <= 1", r + 1, bx[0], bx[1], bx[2], bx[3]);
    }
    if ((s = rs_check_adapter(&o->keypose, "keypose", 3, uc))) return s;
    if ((s = rs_check_adapter(&o->sketch, "sketch", 1, uc))) return s;

    const int h = b->height / f, w = b->width / f, L = uc->in_channels;
    const int n_ctx = b->n_layer_ctx ? b->n_layer_ctx : 1;
    const size_t nl = (size_t)L * h * w, one = (size_t)NB * T * D;   /* one latent; one (2,77,D) context */
    MsScheduler *sch = (MsScheduler *)malloc(sizeof *sch);
    ClipTextParams *tp = (ClipTextParams *)malloc(sizeof *tp);
    VaeParams *vp = (VaeParams *)malloc(sizeof *vp);
    UNetParams *up = (UNetParams *)malloc(sizeof *up);
    MsTorchRng *rng = (MsTorchRng *)malloc(sizeof *rng);
    Arena ar = { 0 }, acts = { 0 };
    UNetActs ua;
    UNetRegions reg;
    int ua_ok = 0, up_ok = 0;
    float *lat = NULL, *in = NULL, *eps = NULL, *work = NULL, *ctx = NULL, *rctx = NULL, *rwork = NULL;
    float *feat[MS_MAX_BLOCKS] = { 0 }, *tmpf[MS_MAX_BLOCKS] = { 0 }, *wmap = NULL;
    const float **lctx = NULL, **rptr = NULL;
    double (*rbox)[4] = NULL;
    size_t nfeat[MS_MAX_BLOCKS] = { 0 };
    const int use_ad = o->keypose.adapter || o->sketch.adapter;
    memset(&reg, 0, sizeof reg);
    if (!sch || !tp || !vp || !up || !rng) { s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory"); goto done; }
    if ((s = ms_scheduler_init(sch, b->sampler, &m->scheduler_config, b->torch_cpu))) goto done;
    if ((s = ms_scheduler_set_timesteps(sch, b->steps))) goto done;
    if ((s = clip_text_params(tp, &m->text, tc))) goto done;
    if ((s = vae_params_init(vp, vc, &m->vae))) goto done;
    if ((s = unet_params_init(up, uc, &m->unet))) goto done;
    up_ok = 1;

    /* plan: one scratch arena for the largest of text encoder, adapters, UNet and VAE decode */
    {
        VaeSizes vz;
        UNetSizes us;
        size_t need = clip_text_sizes(tc, 1, T, 0, 0);
        if ((s = vae_sizes(vc, b->height, b->width, -1, &vz))) goto done;
        if (vz.decode_bytes > need) need = vz.decode_bytes;
        if ((s = unet_sizes(uc, NB, h, w, T, 0, &us))) goto done;
        if (us.scratch_bytes > need) need = us.scratch_bytes;
        for (int k = 0; k < 2; k++) {
            const MsRegionalAdapter *a = k ? &o->sketch : &o->keypose;
            size_t ab;
            if (!a->adapter) continue;
            if ((s = adapter_sizes(&a->adapter->cfg, 1, b->height, b->width, &ab, nfeat))) goto done;
            if (ab > need) need = ab;
        }
        if ((s = arena_init(&ar, need)) || (s = arena_init(&acts, us.acts_bytes))) goto done;
    }
    /* the official box mapping: downscale = sqrt(H W / seq_len), fh = int(H // downscale) must
     * be the layer's own height (else its rearrange fails); checked for every level */
    {
        int lh = h, lw = w, pad = uc->downsample_padding, extra = pad == 0 ? 1 : 2 * pad;
        for (int i = 0; R && i < uc->n_blocks; i++) {
            double ds = sqrt((double)b->height * b->width / ((double)lh * lw));
            int fh = (int)floor((double)b->height / ds), fw = (int)floor((double)b->width / ds);
            if (fh != lh || fw != lw) {
                s = ms_errorf(MS_ERR_ARG, "regional: %d x %d: at UNet level %d (%d x %d latents) the official box "
                              "mapping gives %d x %d; use sides that are multiples of %d", b->width, b->height, i, lw,
                              lh, fw, fh, f << (uc->n_blocks - 1));
                goto done;
            }
            lh = (lh + extra - 3) / 2 + 1;
            lw = (lw + extra - 3) / 2 + 1;
        }
    }
    lat = (float *)ms_alloc_aligned(nl, sizeof(float));
    in = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    eps = (float *)ms_alloc_aligned(2 * nl, sizeof(float));
    work = (float *)ms_alloc_aligned(nl, sizeof(float));
    ctx = (float *)ms_alloc_aligned((size_t)n_ctx * one, sizeof(float));
    lctx = (const float **)malloc((size_t)n_cross * sizeof *lctx);
    if (R) {
        rctx = (float *)ms_alloc_aligned((size_t)R * n_ctx * one, sizeof(float));
        rptr = (const float **)malloc((size_t)R * n_ctx * sizeof *rptr);
        rbox = (double (*)[4])malloc((size_t)R * sizeof *rbox);
        rwork = (float *)ms_alloc_aligned(unet_regions_work_floats(uc, NB, h, w, T), sizeof(float));
    }
    if (!lat || !in || !eps || !work || !ctx || !lctx || (R && (!rctx || !rptr || !rbox || !rwork))) {
        s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory");
        goto done;
    }

    /* 1. prompts: global [neg, pos_i], regions [rneg, rpos_i] */
    if ((s = rs_encode_pair(tp, tc, tok, b, b->prompt, b->negative, n_ctx, ctx, &ar))) goto done;
    for (int i = 0; i < n_cross; i++) lctx[i] = ctx + (size_t)(b->n_layer_ctx ? i : 0) * one;
    for (int r = 0; r < R; r++) {
        float *rc = rctx + (size_t)r * n_ctx * one;
        if ((s = rs_encode_pair(tp, tc, tok, b, o->regions[r].prompt, o->regions[r].negative, n_ctx, rc, &ar))) goto done;
        for (int i = 0; i < n_ctx; i++) rptr[(size_t)r * n_ctx + i] = rc + (size_t)i * one;
        memcpy(rbox[r], o->regions[r].box, sizeof rbox[r]);
    }

    /* 2. initial latents */
    ms_torch_seed(rng, b->seed);
    if (b->init_noise) memcpy(lat, b->init_noise, nl * sizeof(float));
    else ms_torch_randn(rng, lat, nl, b->torch_cpu);
    for (size_t k = 0; k < nl; k++) lat[k] = lat[k] * sch->init_noise_sigma;
    if (o->trace) { int64_t sh[4] = { 1, L, h, w }; o->trace(o->trace_ctx, "latents_init", lat, 4, sh); }

    /* 3. adapter state: keypose_k * W_k + sketch_k * S_k, for both halves */
    if (use_ad) {
        const int nlev = uc->n_blocks;
        size_t maxhw = 0;
        for (int i = 0; i < nlev; i++) {
            feat[i] = (float *)ms_alloc_aligned(nfeat[i] * NB, sizeof(float));
            tmpf[i] = (float *)ms_alloc_aligned(nfeat[i], sizeof(float));
            if (!feat[i] || !tmpf[i]) { s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory"); goto done; }
            size_t hw = nfeat[i] / (size_t)uc->block_out_channels[i];
            if (hw > maxhw) maxhw = hw;
            memset(feat[i], 0, nfeat[i] * sizeof(float));
        }
        if (!(wmap = (float *)malloc(maxhw * sizeof(float)))) { s = ms_errorf(MS_ERR_NOMEM, "regional: out of memory"); goto done; }
        int first = 1;
        for (int k = 0; k < 2; k++) {
            const MsRegionalAdapter *a = k ? &o->sketch : &o->keypose;
            if (!a->adapter) continue;
            if ((s = adapter_forward(a->adapter, &ar, tmpf, a->cond, 1, b->height, b->width))) goto done;
            arena_reset(&ar, 0);
            int fh = b->height / f, fw = b->width / f;
            for (int i = 0; i < nlev; i++) {
                const int C = uc->block_out_channels[i];
                const size_t HW = nfeat[i] / (size_t)C;
                if ((size_t)fh * fw != HW) {   /* adapter levels: AvgPool 2x2 halves (H/8)/2^i */
                    s = ms_errorf(MS_ERR_SHAPE, "regional: adapter level %d: %zu pixels, expected %d x %d", i, HW, fh, fw);
                    goto done;
                }
                ms_regional_weight_map(wmap, fh, fw, b->height, b->width, a);
                for (int c = 0; c < C; c++)
                    for (size_t p = 0; p < HW; p++) {
                        float v = wmap[p] * tmpf[i][(size_t)c * HW + p];     /* spatial_adaptor_weight * feat */
                        feat[i][(size_t)c * HW + p] = first ? v : feat[i][(size_t)c * HW + p] + v;  /* keypose + sketch */
                    }
                fh /= 2; fw /= 2;
            }
            first = 0;
        }
        for (int i = 0; i < nlev; i++) memcpy(feat[i] + nfeat[i], feat[i], nfeat[i] * sizeof(float));  /* cat([v] * 2) */
    }

    /* 4. denoising loop */
    if ((s = unet_acts_init(&ua, uc, NB, h, w, T, 0, &acts, &ar))) goto done;
    ua_ok = 1;
    if (R) {
        reg.n = R;
        reg.box = (const double (*)[4])rbox;
        reg.n_layer_ctx = b->n_layer_ctx;
        reg.ctx = rptr;
        reg.work = rwork;
        ua.regions = &reg;
    }
    {
        double tu = 0.0;
        for (int i = 0; i < sch->num_steps; i++) {
            float t[2];
            char key[48];
            int64_t sh[4] = { NB, L, h, w };
            t[0] = t[1] = (float)sch->timesteps[i];
            memcpy(in, lat, nl * sizeof(float));
            memcpy(in + nl, lat, nl * sizeof(float));               /* cat([latents] * 2) */
            ms_scheduler_scale_model_input(sch, i, in, in, 2 * nl);
            double t0 = ms_time();
            if ((s = unet_forward(eps, &ua, in, t, NULL, (const float *const *)lctx,
                                  use_ad ? (const float *const *)feat : NULL, up, NULL)))
                goto done;
            tu += ms_time() - t0;
            if (o->trace) { snprintf(key, sizeof key, "step%d.eps", i); o->trace(o->trace_ctx, key, eps, 4, sh); }
            const float g = b->guidance_scale;
            for (size_t k = 0; k < nl; k++) eps[k] = eps[k] + g * (eps[nl + k] - eps[k]);
            if ((s = ms_scheduler_step(sch, i, eps, lat, work, nl, rng))) goto done;
            if (o->trace) { sh[0] = 1; snprintf(key, sizeof key, "step%d.latents", i); o->trace(o->trace_ctx, key, lat, 4, sh); }
            if (b->progress) b->progress(b->progress_ctx, i, sch->num_steps, lat, nl);
        }
        if (o->unet_seconds) *o->unet_seconds = tu;
    }

    /* 5. decode(latents / scaling_factor) */
    unet_acts_free(&ua);
    ua_ok = 0;
    arena_free(&acts);
    if (up_ok) { unet_params_free(up); up_ok = 0; }
    ms_gemm_scratch_free();
    ops_scratch_free();
    arena_reset(&ar, 0);
    s = vae_decode(vp, &ar, image, lat, 1, h, w);
done:
    for (int i = 0; i < MS_MAX_BLOCKS; i++) { ms_free_aligned(feat[i]); ms_free_aligned(tmpf[i]); }
    free(wmap);
    ms_free_aligned(lat); ms_free_aligned(in); ms_free_aligned(eps); ms_free_aligned(work);
    ms_free_aligned(ctx); ms_free_aligned(rctx); ms_free_aligned(rwork);
    free(lctx); free(rptr); free(rbox);
    if (ua_ok) unet_acts_free(&ua);
    if (up_ok) unet_params_free(up);
    arena_free(&ar);
    arena_free(&acts);
    free(sch); free(tp); free(vp); free(up); free(rng);
    return s;
}
