/* tools/cmd_sample.c — `mixshow sample`: text to image with a Stable Diffusion 1.x model,
 * diffusers 0.19.3 StableDiffusionPipeline / StableDiffusionAdapterPipeline semantics
 * (the loop itself is ms_txt2img in mixshow.c; this file parses options, reads the condition
 * image, shows progress and writes PNGs).
 *
 * With no --model the shipped world model models/world is used (trained by `mixshow pretrain`;
 * looked up next to the executable, in the install prefix, then in the current directory), else
 * the embedded tiny random-weight model models/tiny-sd (an image in about a second, for smoke
 * tests of a new port). --batch N writes N files, out-0.png .. out-{N-1}.png (out.png for N = 1).
 *
 * Condition images are resized as diffusers' _preprocess_adapter_image does:
 * PIL Image.resize((W, H), LANCZOS) (Pillow 9.4 Resample.c, 8-bit fixed point; reproduced
 * bit for bit by ms_image_resize_lanczos below, tested against Pillow), then / 255. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L         /* isatty, readlink: in the guarded section below */
#endif
#include "tools/tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <unistd.h>
static int stderr_is_tty(void) { return isatty(2); }
#else
static int stderr_is_tty(void) { return 0; }
#endif

/* PIL-exact Lanczos resize: Pillow 9.4 libImaging/Resample.c, the resampler of tools/transforms.c. */
MsStatus ms_image_resize_lanczos(uint8_t *out, int ow, int oh, const uint8_t *in, int w, int h, int C) {
    return pil_resize(out, ow, oh, in, w, h, C, PIL_LANCZOS);
}

/* ---- mixshow sample ---- */
static void sample_usage(FILE *f) {
    fprintf(f,
        "usage: mixshow sample [--model PATH] -p PROMPT [-n NEGATIVE] [--steps 50] [--cfg 7.5]\n"
        "                      [--seed 0] [-W WIDTH] [-H HEIGHT] [--sampler dpm++2m|ddim|euler|ddpm]\n"
        "                      [--batch N] [--adapter DIR --cond IMAGE [--adapter-scale 1.0]]\n"
        "                      [--init-noise FILE.safetensors] [--torch-cpu avx2|default] [--threads N]\n"
        "                      [--weights f32|f16] [--edlora FILE[:ALPHA]] -o OUT.png\n\n"
        "Text to image, as diffusers 0.19.3 StableDiffusionPipeline (StableDiffusionAdapterPipeline\n"
        "with --adapter): the same seed gives the same latents as torch.Generator().manual_seed(seed).\n"
        "  --model PATH    diffusers folder or single file (default: models/world, the shipped world\n"
        "                  model, else models/tiny-sd, the tiny random-weight model; next to the\n"
        "                  executable, in the install prefix or in the current directory)\n"
        "  -W, -H          size in pixels, multiples of 8 (default: the UNet's sample_size * 8)\n"
        "  --cfg S         guidance scale; CFG (with the negative prompt, default \"\") when S > 1\n"
        "  --sampler       dpm++2m (DPMSolverMultistep, default), ddim, euler, ddpm, each built from\n"
        "                  the model's scheduler_config.json\n"
        "  --batch N       N images (num_images_per_prompt): OUT-0.png .. OUT-{N-1}.png\n"
        "  --adapter DIR   T2I-Adapter (diffusers folder or TencentARC file); --cond: PNG/JPEG condition,\n"
        "                  read as grey or RGB (the adapter's in_channels), resized with PIL's Lanczos\n"
        "  --init-noise F  initial noise (B,4,H/8,W/8) from a safetensors file (its only tensor or\n"
        "                  'init_noise') instead of randn; still multiplied by init_noise_sigma\n"
        "  --threads N     threads (0: all cores; default: OMP_NUM_THREADS, else all cores, 1 for a\n"
        "                  tiny model); the image does not depend on it\n"
        "  --torch-cpu     which torch.randn kernel to mirror: avx2 (stock x86-64 torch, default) or\n"
        "                  default (ATEN_CPU_CAPABILITY=default, ARM)\n"
        "  --weights f16   keep F16/BF16 tensors 16-bit in memory, converted to f32 when used (half\n"
        "                  the weight memory, same image as f32 on the rounded weights); f32 (default)\n"
        "                  widens every tensor at load\n"
        "  --edlora F[:A]  a Mix-of-Show ED-LoRA / LoRA file (.pth or .safetensors), sampled as the\n"
        "                  official EDLoRAPipeline after convert_edlora(alpha=A): new tokens <new0>..,\n"
        "                  LoRA merged into the weights at A (default 0.7, the README's and the test\n"
        "                  configs' value), the prompt's concept words bound per cross-attention layer\n"
        "                  (the negative prompt is not bound). Plain LoRA files (1 token per word):\n"
        "                  merged and the tokens added, prompt used as given. Needs f32 weights.\n"
        );
    fprintf(f,
        "Regionally controllable sampling (Mix-of-Show regionally_controlable_sampling.py, same option\n"
        "names; any of them selects it; `--x=v` or `--x v`):\n"
        "  --pretrained_model DIR   a fused model (new_concept_cfg.json + added tokens) or a base model\n"
        "                           (default: models/world, else models/tiny-sd, as --model)\n"
        "  --prompt P, --negative_prompt N   the global prompt and negative prompt\n"
        "  --prompt_rewrite '[<prompt>]-*-[<negative>]-*-[t, l, b, r]|...'   regions, boxes in pixels\n"
        "  --keypose_condition IMG, --keypose_adaptor_weight W, --region_keypose_adaptor_weight\n"
        "                           '[t, l, b, r]-w|...'   (per-region weights: the paper's, the official\n"
        "                           pipeline crashes on them); --sketch_* the same for the sketch adapter\n"
        "  --adapter-keypose DIR, --adapter-sketch DIR   adapter weights (default MODEL/t2iadapter_openpose,\n"
        "                           MODEL/t2iadapter_sketch, then models/t2iadapter_*_sd14v1)\n"
        "  --save_dir D, --suffix S, --seed N   output D/seed_N/<prompt>---<S>---<sha8>.png (+ .txt)\n"
        "  --overlay                also write the boxes and region prompts drawn over the image\n"
        "  --trace OUT.safetensors  latents_init [1,4,h,w], step{i}.eps [2,4,h,w] (uncond, cond),\n"
        "                           step{i}.latents [1,4,h,w]: the fixed verification interface\n"
        "Progress goes to stderr when it is a terminal.\n");
}


typedef struct { double t0; int tty; } Progress;

static void progress_cb(void *ctx, int step, int n_steps, const float *latents, size_t n) {
    Progress *p = (Progress *)ctx;
    (void)latents; (void)n;
    if (!p->tty) return;
    double el = ms_time() - p->t0, per = el / (step + 1), eta = per * (n_steps - step - 1);
    int bar = 30, fill = (step + 1) * bar / n_steps;
    char b[64];
    for (int i = 0; i < bar; i++) b[i] = i < fill ? '#' : '.';
    b[bar] = 0;
    fprintf(stderr, "\r  step %3d/%-3d [%s] %6.2f s/step, ETA %5.0f s ", step + 1, n_steps, b, per, eta);
    if (step + 1 == n_steps) fprintf(stderr, "\n");
    fflush(stderr);
}

static MsStatus load_init_noise(const char *path, size_t n, float **out) {
    StFile f;
    MsStatus s = st_open(&f, path);
    if (s) return s;
    const StTensor *t = st_find(&f, "init_noise");
    if (!t && f.count == 1) t = &f.tensors[0];
    if (!t) s = ms_errorf(MS_ERR_ARG, "%s: expected one tensor or one named 'init_noise'", path);
    else if (t->numel != n) s = ms_errorf(MS_ERR_SHAPE, "%s: '%s' has %zu values, expected %zu (batch x 4 x H/8 x W/8)", path, t->name, t->numel, n);
    else if (!(*out = (float *)ms_alloc_aligned(n, sizeof(float)))) s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    else s = st_to_f32(&f, t, *out, n);
    st_close(&f);
    return s;
}

/* diffusers _preprocess_adapter_image: PIL resize((W, H), LANCZOS), np.array / 255 -> (1,C,H,W) */
static MsStatus load_cond(const char *path, int C, int W, int H, float **out) {
    MsImage img;
    MsStatus s = ms_image_read(path, C, &img);
    if (s) return s;
    uint8_t *px = (uint8_t *)malloc((size_t)W * H * C);
    float *x = (float *)ms_alloc_aligned((size_t)W * H * C, sizeof(float));
    if (!px || !x) s = ms_errorf(MS_ERR_NOMEM, "%s: out of memory", path);
    else s = ms_image_resize_lanczos(px, W, H, (const uint8_t *)img.data, img.w, img.h, C);
    if (!s) {
        for (int c = 0; c < C; c++)
            for (size_t p = 0; p < (size_t)W * H; p++) x[(size_t)c * W * H + p] = (float)px[p * C + c] / 255.0f;
        *out = x;
    } else {
        ms_free_aligned(x);
    }
    free(px);
    ms_image_free(&img);
    return s;
}

MsStatus sample_load_cond(const char *path, int C, int W, int H, float **out) { return load_cond(path, C, W, H, out); }

int cmd_sample(int argc, char **argv) {
    if (regional_wanted(argc, argv)) return cmd_sample_regional(argc, argv);   /* tools/regional.c */
    const char *model = NULL, *config_dir = NULL, *tokenizer_dir = NULL, *out = NULL, *adapter_dir = NULL, *cond_path = NULL, *noise_path = NULL;
    char edlora_path[2048] = "";
    float edlora_alpha = 0.7f;                 /* README.md sample and test configs' alpha_list (0, 0.7, 1) */
    int threads = -1;
    MsLoadOptions lo;
    MsTxt2ImgOptions o;
    memset(&lo, 0, sizeof lo);
    memset(&o, 0, sizeof o);
    o.steps = 50; o.guidance_scale = 7.5f; o.batch = 1; o.sampler = MS_SCHED_DPMSOLVER;
    o.torch_cpu = MS_TORCH_CPU_AVX2; o.adapter_scale = 1.0f;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { sample_usage(stdout); return 0; }
        if (!v) { fprintf(stderr, "mixshow sample: %s needs a value (or is unknown; see --help)\n", a); return 2; }
        i++;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--config")) config_dir = v;
        else if (!strcmp(a, "--tokenizer")) tokenizer_dir = v;
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) o.prompt = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--negative")) o.negative = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--adapter")) adapter_dir = v;
        else if (!strcmp(a, "--cond")) cond_path = v;
        else if (!strcmp(a, "--init-noise")) noise_path = v;
        else if (!strcmp(a, "--edlora")) {
            const char *colon = strrchr(v, ':');
            char *e2 = NULL;
            float al = colon ? strtof(colon + 1, &e2) : 0.0f;
            size_t n = colon && e2 && e2 != colon + 1 && !*e2 ? (size_t)(colon - v) : strlen(v);
            if (n != strlen(v)) edlora_alpha = al;
            if (n == 0 || n >= sizeof edlora_path) { fprintf(stderr, "mixshow sample: --edlora %s: bad path\n", v); return 2; }
            memcpy(edlora_path, v, n);
            edlora_path[n] = '\0';
        }
        else if (!strcmp(a, "--steps")) o.steps = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--batch")) o.batch = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "-W") || !strcmp(a, "--width")) o.width = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "-H") || !strcmp(a, "--height")) o.height = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--seed")) o.seed = (uint64_t)strtoull(v, &end, 10);
        else if (!strcmp(a, "--threads")) threads = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--weights")) {
            if (!strcmp(v, "f16") || !strcmp(v, "half")) lo.keep_half = 1;
            else if (!strcmp(v, "f32")) lo.keep_half = 0;
            else { fprintf(stderr, "mixshow sample: --weights %s: expected f32 or f16\n", v); return 2; }
        }
        else if (!strcmp(a, "--cfg")) o.guidance_scale = strtof(v, &end);
        else if (!strcmp(a, "--adapter-scale")) o.adapter_scale = strtof(v, &end);
        else if (!strcmp(a, "--sampler")) {
            if (!strcmp(v, "dpm++2m") || !strcmp(v, "dpm")) o.sampler = MS_SCHED_DPMSOLVER;
            else if (!strcmp(v, "ddim")) o.sampler = MS_SCHED_DDIM;
            else if (!strcmp(v, "euler")) o.sampler = MS_SCHED_EULER;
            else if (!strcmp(v, "ddpm")) o.sampler = MS_SCHED_DDPM;
            else { fprintf(stderr, "mixshow sample: --sampler %s: expected dpm++2m, ddim, euler or ddpm\n", v); return 2; }
        } else if (!strcmp(a, "--torch-cpu")) {
            if (!strcmp(v, "avx2")) o.torch_cpu = MS_TORCH_CPU_AVX2;
            else if (!strcmp(v, "default")) o.torch_cpu = MS_TORCH_CPU_DEFAULT;
            else { fprintf(stderr, "mixshow sample: --torch-cpu %s: expected avx2 or default\n", v); return 2; }
        } else { fprintf(stderr, "mixshow sample: unknown option '%s'\n\n", a); sample_usage(stderr); return 2; }
        if (end && (*end || end == v)) { fprintf(stderr, "mixshow sample: %s %s: not a number\n", a, v); return 2; }
    }
    if (!o.prompt || !out) { fprintf(stderr, "mixshow sample: -p PROMPT and -o OUT.png are required\n\n"); sample_usage(stderr); return 2; }
    if (!!adapter_dir != !!cond_path) { fprintf(stderr, "mixshow sample: --adapter and --cond go together\n"); return 2; }

    MsModel m;
    ClipTokenizer tok;
    AdapterConfig ac;
    MsParamTable at;
    AdapterParams ap;
    int have_m = 0, have_tok = 0, have_ad = 0;
    EdloraFile ef;
    EdloraPrompt ep;
    memset(&ef, 0, sizeof ef);
    memset(&ep, 0, sizeof ep);
    float *image = NULL, *noise = NULL, *cond = NULL;
    uint8_t *px = NULL;
    double t0 = ms_time();
    MsOpenOptions oo = { tokenizer_dir, config_dir, lo.keep_half, 0 };
    MsStatus s = ms_open_model(model, &oo, &m, &tok, NULL, 0);   /* model NULL: models/world, else models/tiny-sd */
    if (!s) { have_m = 1; have_tok = 1; }
    if (!s) {
        int f = 1 << (m.vae_config.n_blocks - 1);
        if (!o.width) o.width = m.unet_config.sample_size * f;     /* unet.config.sample_size * vae_scale_factor */
        if (!o.height) o.height = m.unet_config.sample_size * f;
        if (o.width <= 0 || o.height <= 0 || o.width % f || o.height % f || o.width > 8192 || o.height > 8192)
            s = ms_errorf(MS_ERR_ARG, "-W %d -H %d: sides must be positive multiples of %d", o.width, o.height, f);
    }
    /* Threads: --threads N; else OMP_NUM_THREADS; else all cores, except for a tiny model
     * (UNet width < 128) where the work per op is too small to pay for OpenMP barriers (on a
     * loaded machine they cost 100x the sampling itself). Results do not depend on it. */
    if (threads >= 0) ms_set_threads(threads);
    else if (!s && m.unet_config.block_out_channels[0] < 128 && !getenv("OMP_NUM_THREADS")) ms_set_threads(1);
    if (!s && edlora_path[0]) {               /* convert_edlora(pipe, torch.load(path), enable_edlora, alpha) */
        s = edlora_read(edlora_path, &ef);
        if (!s) s = edlora_merge(&m, &ef, edlora_alpha);
        if (!s) s = edlora_prepare(&ef, &tok, &m, &ep, &o);
        if (!s)
            fprintf(stderr, "mixshow sample: %s: %d concept word(s) x %d token(s), %d + %d LoRA modules merged at alpha %g\n",
                    edlora_path, ef.n_emb, edlora_tokens_per_word(&ef), ef.n_te, ef.n_unet, (double)edlora_alpha);
    }
    if (!s && adapter_dir) {
        s = ms_adapter_load(adapter_dir, &lo, &ac, &at);
        if (!s) { have_ad = 1; s = adapter_params_init(&ap, &ac, &at); }
        if (!s) s = load_cond(cond_path, ac.in_channels, o.width, o.height, &cond);
        if (!s) { o.adapter = &ap; o.cond = cond; }
    }
    const int f = have_m ? 1 << (m.vae_config.n_blocks - 1) : 8;       /* the VAE's downsampling factor */
    const int h = o.height / f, w = o.width / f, L = have_m ? m.vae_config.latent_channels : 4;
    if (!s && noise_path) {
        s = load_init_noise(noise_path, (size_t)o.batch * L * h * w, &noise);
        o.init_noise = noise;
    }
    const size_t per = (size_t)3 * o.width * o.height;
    if (!s && (o.batch < 1 || o.batch > 64)) s = ms_errorf(MS_ERR_ARG, "--batch %d: expected 1..64", o.batch);
    if (!s && (!(image = (float *)ms_alloc_aligned(per * o.batch, sizeof(float))) || !(px = (uint8_t *)malloc(per))))
        s = ms_errorf(MS_ERR_NOMEM, "out of memory for %d images of %d x %d", o.batch, o.width, o.height);
    double t1 = ms_time();
    Progress pr = { 0.0, stderr_is_tty() };
    if (!s) {
        pr.t0 = ms_time();
        o.progress = progress_cb;
        o.progress_ctx = &pr;
        o.release = &m;                          /* one run: each network freed when done */
        s = ms_txt2img(&m, &tok, &o, image);
    }
    double t2 = ms_time();
    for (int b = 0; !s && b < o.batch; b++) {
        char path[4200];
        if (o.batch == 1) snprintf(path, sizeof path, "%s", out);
        else {
            const char *dot = strrchr(out, '.'), *slash = strrchr(out, '/');
            if (!dot || (slash && dot < slash)) dot = out + strlen(out);
            snprintf(path, sizeof path, "%.*s-%d%s", (int)(dot - out), out, b, dot);
        }
        ms_image_to_u8(px, image + per * b, 3, o.height, o.width);
        s = ms_png_write(path, px, o.width, o.height, 3);
        if (!s) fprintf(stderr, "mixshow sample: wrote %s\n", path);
    }
    if (!s) {
        fprintf(stderr, "mixshow sample: %d x %d, %d steps, batch %d: load %.2f s, sampling + decode %.2f s",
                o.width, o.height, o.steps, o.batch, t1 - t0, t2 - t1);
        FILE *st = fopen("/proc/self/status", "r");       /* Linux: peak resident memory; else skipped */
        char line[256];
        while (st && fgets(line, sizeof line, st))
            if (!strncmp(line, "VmHWM:", 6)) { fprintf(stderr, ", peak memory %.0f MiB", strtod(line + 6, NULL) / 1024.0); break; }
        if (st) fclose(st);
        fprintf(stderr, "\n");
    }
    else fprintf(stderr, "mixshow sample: %s\n", ms_last_error());
    edlora_prompt_free(&ep);
    edlora_free(&ef);
    if (have_ad) ms_param_table_free(&at);
    if (have_tok) clip_tokenizer_free(&tok);
    if (have_m) ms_model_free(&m);
    ms_free_aligned(image); ms_free_aligned(noise); ms_free_aligned(cond);
    free(px);
    return s ? 1 : 0;
}
