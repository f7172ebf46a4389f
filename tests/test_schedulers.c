/* tests/test_schedulers.c — models/schedulers.c against torch 1.13 and diffusers 0.19.3.
 *
 * tests/data/sched_golden.safetensors comes from tools/ref/gen_sched_golden.py, run once per
 * torch CPU kernel set (keys "default/..." = ATEN_CPU_CAPABILITY=default, "avx2/..." = what
 * stock torch runs on this AVX-512 machine). Checked here:
 *   - mt19937 against the published reference outputs (independent of torch);
 *   - torch.randn bit for bit: sizes under 16 (scalar Box-Muller with the cached sample), 16
 *     and over (normal_fill, tail recomputed), the state after a draw, torch.Generator;
 *   - betas, alphas_cumprod and the DPM-Solver alpha/sigma bit for bit, lambda_t to libm;
 *   - timesteps of DDPM, DDIM, Euler, DPM-Solver for N = 1, 10, 20, 25, 50 and every spacing,
 *     exactly; Euler's sigmas and init_noise_sigma bit for bit;
 *   - 10-25 step trajectories with a fake model eps = 0.1 x_in + sin(t/100), and DDPM add_noise;
 *   - bad arguments return a status with a message.
 */
#include "test.h"

#include <inttypes.h>
#include "tools/tools.h"

static StFile G;
static const char *CAP[2] = { "default", "avx2" };
static const MsTorchCpu CPU[2] = { MS_TORCH_CPU_DEFAULT, MS_TORCH_CPU_AVX2 };

/* The golden tensor `key` converted to double (F32, F64, I64); NULL (and a failed check) when
 * absent or of another size. Bytes are little-endian in the file. */
static double *golden(const char *key, size_t n_expected) {
    const StTensor *t = st_find(&G, key);
    if (!t || (n_expected && t->numel != n_expected) ||
        (t->dtype != ST_F32 && t->dtype != ST_F64 && t->dtype != ST_I64)) {
        check(0, "golden tensor %s (%zu values) present", key, n_expected);
        return NULL;
    }
    double *out = (double *)malloc((t->numel ? t->numel : 1) * sizeof *out);
    if (!out) { printf("out of memory\n"); exit(2); }
    for (size_t i = 0; i < t->numel; i++) {
        const unsigned char *p = t->data + i * st_dtype_size(t->dtype);
        uint64_t u = 0;
        for (size_t b = st_dtype_size(t->dtype); b-- > 0;) u = u << 8 | p[b];
        if (t->dtype == ST_F32) { uint32_t w = (uint32_t)u; float f; memcpy(&f, &w, 4); out[i] = f; }
        else if (t->dtype == ST_F64) { double d; memcpy(&d, &u, 8); out[i] = d; }
        else out[i] = (double)(int64_t)u;
    }
    return out;
}
static size_t golden_numel(const char *key) { const StTensor *t = st_find(&G, key); return t ? t->numel : 0; }

/* Bit-exact comparison of float results with a golden F32 tensor; prints the worst ulp. */
static int check_bits(const char *what, const float *got, const char *key, size_t n) {
    double *w = golden(key, n);
    if (!w) return 0;
    size_t bad = 0, first = n; int64_t worst = 0;
    for (size_t i = 0; i < n; i++) {
        float wf = (float)w[i];
        if (memcmp(&wf, &got[i], 4)) {
            int32_t a, b; memcpy(&a, &wf, 4); memcpy(&b, &got[i], 4);
            int64_t d = (int64_t)a - b; if (d < 0) d = -d; if (d > worst) worst = d;
            if (first == n) first = i;
            bad++;
        }
    }
    check(bad == 0, "%-44s %zu values bit-exact%s", what, n, bad ? " -- NO" : "");
    if (bad) printf("      %zu differ, first at %zu: %.9g vs %.9g, worst %" PRId64 " ulp\n", bad, first,
                    (double)got[first], w[first], worst);
    free(w);
    return bad == 0;
}

static uint64_t fnv1a64(const float *x, size_t n) {
    uint64_t h = 0xcbf29ce484222325u;
    for (size_t i = 0; i < n; i++) {
        uint32_t u; memcpy(&u, &x[i], 4);
        for (int b = 0; b < 4; b++) { h ^= (u >> (8 * b)) & 0xffu; h *= 0x100000001b3u; }
    }
    return h;
}

/* ---------------------------------------------------------------------------------------- */
static void test_mt19937(void) {
    /* Matsumoto & Nishimura's mt19937ar.c: init_genrand(5489) first output 3499211612; the
     * C++ standard: the 10000th output of a default-constructed std::mt19937 is 4123659995. */
    MsTorchRng g; ms_torch_seed(&g, 5489);
    uint32_t first = ms_torch_random(&g), x = first;
    for (int i = 1; i < 10000; i++) x = ms_torch_random(&g);
    check(first == 3499211612u && x == 4123659995u, "mt19937: 1st %u, 10000th %u", first, x);
    MsTorchRng a, b; ms_torch_seed(&a, 5); ms_torch_seed(&b, ((uint64_t)1 << 32) + 5);
    check(ms_torch_random(&a) == ms_torch_random(&b), "mt19937: seed 2^32+5 acts as 5 (torch truncates)");
    ms_torch_seed(&a, 1); ms_torch_seed(&b, 1);
    uint64_t hi = ms_torch_random(&a), lo = ms_torch_random(&a);
    check(ms_torch_random64(&b) == (hi << 32 | lo), "random64: first word is the high half");
}

static void test_torch_randn(int c) {
    char key[256], what[128];
    static const int shapes[][4] = { {1}, {3}, {15}, {16}, {17}, {33}, {2, 4, 8, 8}, {1, 4, 64, 64} };
    static const char *names[] = { "1", "3", "15", "16", "17", "33", "2x4x8x8", "1x4x64x64" };
    static const uint64_t seeds[] = { 0, 42, ((uint64_t)1 << 32) + 5 };
    float *x = test_zeros(16384);
    for (int si = 0; si < 3; si++)
        for (int k = 0; k < 8; k++) {
            size_t n = 1;
            for (int d = 0; d < 4 && shapes[k][d]; d++) n *= (size_t)shapes[k][d];
            MsTorchRng g; ms_torch_seed(&g, seeds[si]);
            for (int rep = 0; rep < 2; rep++) {
                const char *tag = rep ? "second" : "first";
                ms_torch_randn(&g, x, n, CPU[c]);
                snprintf(what, sizeof what, "%s randn s%" PRIu64 " %s %s", CAP[c], seeds[si], names[k], tag);
                if (n <= 1024) {
                    snprintf(key, sizeof key, "%s/rng/s%" PRIu64 "/%s/%s", CAP[c], seeds[si], names[k], tag);
                    check_bits(what, x, key, n);
                } else {
                    snprintf(key, sizeof key, "%s/rng/s%" PRIu64 "/%s/%s_head", CAP[c], seeds[si], names[k], tag);
                    int ok = check_bits(what, x, key, 256);
                    snprintf(key, sizeof key, "%s/rng/s%" PRIu64 "/%s/%s_tail", CAP[c], seeds[si], names[k], tag);
                    ok &= check_bits(what, x + n - 256, key, 256);
                    snprintf(key, sizeof key, "%s/rng/s%" PRIu64 "/%s/%s_fnv", CAP[c], seeds[si], names[k], tag);
                    double *h = golden(key, 1);
                    const StTensor *t = st_find(&G, key);
                    uint64_t want = 0;
                    if (t) for (int b = 7; b >= 0; b--) want = want << 8 | t->data[b];
                    check(h && fnv1a64(x, n) == want, "%-44s all %zu values: FNV-1a %016" PRIx64, what, n,
                          fnv1a64(x, n));
                    free(h);
                    (void)ok;
                }
            }
        }
    /* sizes 3, 16, 1, 17, 2 in a row: the cached sine sample of the 3-draw is used by the 1-draw */
    MsTorchRng g; ms_torch_seed(&g, 7);
    size_t off = 0; static const size_t seq[] = { 3, 16, 1, 17, 2 };
    for (int i = 0; i < 5; i++) { ms_torch_randn(&g, x + off, seq[i], CPU[c]); off += seq[i]; }
    snprintf(key, sizeof key, "%s/rng/seq_s7_3_16_1_17_2", CAP[c]);
    snprintf(what, sizeof what, "%s randn 3,16,1,17,2 in a row", CAP[c]);
    check_bits(what, x, key, off);
    ms_torch_seed(&g, 42);
    ms_torch_randn(&g, x, 512, CPU[c]); ms_torch_randn(&g, x + 512, 3, CPU[c]);
    snprintf(key, sizeof key, "%s/rng/gen_s42_512_3", CAP[c]);
    snprintf(what, sizeof what, "%s randn torch.Generator 512 then 3", CAP[c]);
    check_bits(what, x, key, 515);
    ms_torch_seed(&g, 5489);
    for (int i = 0; i < 8; i++) x[i] = (float)(ms_torch_random(&g) & 0xffffffu) * (1.0f / 16777216.0f);
    snprintf(key, sizeof key, "%s/rng/uniform_s5489_8", CAP[c]);
    snprintf(what, sizeof what, "%s uniform_ = low 24 bits of random()", CAP[c]);
    check_bits(what, x, key, 8);
    /* skip == draw and discard */
    MsTorchRng a, b;
    static const size_t skips[] = { 1, 3, 15, 16, 17, 100 };
    int same = 1;
    ms_torch_seed(&a, 9); ms_torch_seed(&b, 9);
    for (int i = 0; i < 6; i++) { ms_torch_randn(&a, x, skips[i], CPU[c]); ms_torch_randn_skip(&b, skips[i]); }
    ms_torch_randn(&a, x, 5, CPU[c]); ms_torch_randn(&b, x + 5, 5, CPU[c]);
    for (int i = 0; i < 5; i++) same &= x[i] == x[5 + i];
    check(same, "%s randn_skip leaves the generator where randn does", CAP[c]);
    ms_free_aligned(x);
}

/* The SIMD kernels of torch.randn (tensor.c) against their scalar definitions, bit for bit, at
 * every SIMD level this CPU has: the mt19937 refill over 64 rounds from a random state; the
 * tempering + 24-bit uniform at odd lengths and offsets; normal_fill_16 (both torch kernels)
 * with every 31st of the 2^24 possible uniforms in the log position and in the sincos position
 * (u = 0 and the largest u included); then long streams of ms_torch_randn (sizes under 16, odd
 * sizes, the tail path, more than one refill; in a row, from 3 seeds) against the scalar level. */
static void test_randn_simd(void) {
    MsSimd top = ms_simd();
    MsRng r; ms_rng_seed(&r, 77);
    const size_t NU = 1 << 24, step = 31, nb = (NU / step + 7) / 8;
    float *d0 = (float *)malloc(nb * 16 * sizeof(float)), *d1 = (float *)malloc(nb * 16 * sizeof(float));
    float *x0 = test_zeros(70000), *x1 = test_zeros(70000);
    uint32_t st0[624], st1[624], words[1100];
    if (!check(d0 && d1, "memory")) { free(d0); free(d1); return; }
    for (int l = MS_SIMD_SCALAR; l <= (int)top; l++) {
        ms_set_simd((MsSimd)l);
        if (ms_simd() != (MsSimd)l) continue;
        const char *ln = ms_simd_name((MsSimd)l);
        int bad = 0;
        for (int i = 0; i < 624; i++) st0[i] = st1[i] = (uint32_t)ms_rng_u64(&r);
        for (int k = 0; k < 64; k++) {
            ms_mt19937_twist(st0); ms_mt19937_twist_ref(st1);
            bad += memcmp(st0, st1, sizeof st0) != 0;
        }
        check(bad == 0, "%s: mt19937 refill == _ref over 64 rounds (%d differ)", ln, bad);
        bad = 0;
        for (int i = 0; i < 1100; i++) words[i] = (uint32_t)ms_rng_u64(&r);
        static const size_t offs[] = { 0, 1, 5, 8 }, lens[] = { 1, 7, 8, 9, 16, 17, 624, 1001 };
        for (size_t a = 0; a < 4; a++)
            for (size_t b = 0; b < 8; b++) {
                ms_mt_uniform24(x0, words + offs[a], lens[b]);
                ms_mt_uniform24_ref(x1, words + offs[a], lens[b]);
                bad += memcmp(x0, x1, lens[b] * sizeof(float)) != 0;
            }
        check(bad == 0, "%s: tempering + uniform24 == _ref at odd lengths and offsets (%d differ)", ln, bad);
        for (int avx = 0; avx < 2; avx++)
            for (int pos = 0; pos < 2; pos++) {          /* the uniforms in d[0..8) (log) or d[8..16) (sincos) */
                for (size_t b = 0; b < nb; b++)
                    for (int j = 0; j < 8; j++) {
                        size_t u = (b * 8 + (size_t)j) * step;
                        float uv = (float)(u < NU ? u : NU - 1) * (1.0f / 16777216.0f), other = (float)((b * 8 + j) % 997) / 997.0f;
                        d0[b * 16 + j + 8 * pos] = uv;
                        d0[b * 16 + j + 8 * (1 - pos)] = other;
                    }
                memcpy(d1, d0, nb * 16 * sizeof(float));
                ms_torch_normal16(d0, nb, avx);
                ms_torch_normal16_ref(d1, nb, avx);
                size_t diff = 0;
                for (size_t i = 0; i < nb * 16; i++) diff += memcmp(&d0[i], &d1[i], 4) != 0;
                check(diff == 0, "%s: normal_fill_16 (%s kernel) == _ref, every 31st uniform as %s (%zu differ)", ln,
                      avx ? "avx2" : "default", pos ? "u2 (sincos)" : "u1 (log)", diff);
            }
        static const size_t sizes[] = { 1, 2, 3, 15, 16, 17, 31, 33, 100, 623, 624, 625, 1000, 1247, 16384, 65537 };
        for (int c = 0; c < 2; c++)
            for (uint64_t seed = 0; seed < 3; seed++) {
                MsTorchRng g0, g1;
                ms_torch_seed(&g0, seed * 1000003u); ms_torch_seed(&g1, seed * 1000003u);
                bad = 0;
                for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
                    size_t n = sizes[(i + (size_t)seed * 5) % (sizeof sizes / sizeof sizes[0])];
                    ms_torch_randn(&g0, x0, n, CPU[c]);
                    ms_set_simd(MS_SIMD_SCALAR);
                    ms_torch_randn(&g1, x1, n, CPU[c]);
                    ms_set_simd((MsSimd)l);
                    bad += memcmp(x0, x1, n * sizeof(float)) != 0;
                }
                bad += memcmp(g0.mt, g1.mt, sizeof g0.mt) != 0 || g0.next != g1.next || g0.has_normal != g1.has_normal;
                check(bad == 0, "%s: %s randn stream of 16 sizes (1..65537), seed %d == scalar level (%d differ)", ln,
                      CAP[c], (int)seed, bad);
            }
    }
    ms_set_simd(top);
    free(d0); free(d1);
    ms_free_aligned(x0); ms_free_aligned(x1);
}

/* ---------------------------------------------------------------------------------------- */
static void test_schedule(int c) {
    SchedulerConfig cfg; ms_scheduler_config_sd15(&cfg);
    MsScheduler *s = (MsScheduler *)malloc(sizeof *s);
    char key[128], what[128];
    if (!s) { printf("out of memory\n"); exit(2); }
    check(ms_scheduler_init(s, MS_SCHED_DPMSOLVER, &cfg, CPU[c]) == MS_OK, "%s init DPM-Solver", CAP[c]);
    static const char *names[] = { "betas", "alphas_cumprod", "dpm_alpha_t", "dpm_sigma_t" };
    const float *arrs[] = { s->betas, s->alphas_cumprod, s->alpha_t, s->sigma_t };
    for (int k = 0; k < 4; k++) {
        snprintf(key, sizeof key, "%s/sched/%s", CAP[c], names[k]);
        snprintf(what, sizeof what, "%s %s", CAP[c], names[k]);
        check_bits(what, arrs[k], key, 1000);
    }
    /* lambda_t = log(alpha) - log(sigma): the default kernels call libm's logf (bit-exact on
     * glibc); the AVX2 ones Sleef_logf8_u10, within 1 ulp of the true log, so the difference
     * of two logs may move by a couple of float ulps of the larger log. */
    snprintf(key, sizeof key, "%s/sched/dpm_lambda_t", CAP[c]);
    double *w = golden(key, 1000);
    if (w) {
        double worst = 0.0; size_t nbad = 0;
        for (int t = 0; t < 1000; t++) {
            double scale = fabs(log((double)s->alpha_t[t])) + fabs(log((double)s->sigma_t[t]));
            double e = fabs((double)s->lambda_t[t] - w[t]) / scale;
            worst = fmax(worst, e); nbad += (float)w[t] != s->lambda_t[t];
        }
        if (c == 0) check(nbad == 0, "%-44s bit-exact (%zu differ)", "default dpm_lambda_t", nbad);
        else check(worst <= 2.5e-7, "%-44s %zu of 1000 differ, worst %.2e of |log a|+|log s| (tol 2.5e-7, 2 ulp)",
                   "avx2 dpm_lambda_t vs Sleef", nbad, worst);
        free(w);
    }
    free(s);
}

static void test_timesteps(int c) {
    static const char *kinds[] = { "ddpm", "ddim", "euler", "dpm" };
    static const char *spaces[] = { "config", "linspace", "leading", "trailing" };
    static const MsTimestepSpacing spv[] = { MS_SPACING_ABSENT, MS_SPACING_LINSPACE, MS_SPACING_LEADING, MS_SPACING_TRAILING };
    static const int steps[] = { 1, 10, 20, 25, 50 };
    MsScheduler *s = (MsScheduler *)malloc(sizeof *s);
    if (!s) { printf("out of memory\n"); exit(2); }
    char key[160];
    int lists = 0, lists_ok = 0, sig_ok = 1;
    for (int k = 0; k < 4; k++)
        for (int sp = 0; sp < 4; sp++)
            for (int j = 0; j < 5; j++) {
                SchedulerConfig cfg; ms_scheduler_config_sd15(&cfg);
                cfg.timestep_spacing = spv[sp];
                int ok = ms_scheduler_init(s, (MsSchedKind)k, &cfg, CPU[c]) == MS_OK &&
                         ms_scheduler_set_timesteps(s, steps[j]) == MS_OK;
                snprintf(key, sizeof key, "%s/ts/%s/%s/N%d", CAP[c], kinds[k], spaces[sp], steps[j]);
                size_t n = golden_numel(key);
                double *w = golden(key, 0);
                lists++;
                ok = ok && w && (size_t)s->num_steps == n;
                for (size_t i = 0; ok && i < n; i++) ok = s->timesteps[i] == w[i];
                if (!ok) {
                    printf("      %s: got %d steps:", key, s->num_steps);
                    for (int i = 0; i < s->num_steps && i < 8; i++) printf(" %g", s->timesteps[i]);
                    printf("  want %zu:", n);
                    for (size_t i = 0; w && i < n && i < 8; i++) printf(" %g", w[i]);
                    printf("\n");
                }
                lists_ok += ok;
                free(w);
                if (k == 2 && ok) {
                    char k2[200];
                    snprintf(k2, sizeof k2, "%s/sigmas", key);
                    double *ws = golden(k2, n + 1);
                    for (size_t i = 0; ws && i <= n; i++) sig_ok &= (float)ws[i] == s->sigmas[i];
                    free(ws);
                    snprintf(k2, sizeof k2, "%s/init_noise_sigma", key);
                    ws = golden(k2, 1);
                    sig_ok &= ws && (float)ws[0] == s->init_noise_sigma;
                    free(ws);
                }
            }
    check(lists_ok == lists, "%s timesteps: %d of %d lists exact (4 schedulers x 4 spacings x N 1,10,20,25,50)",
          CAP[c], lists_ok, lists);
    check(sig_ok, "%s Euler sigmas and init_noise_sigma bit-exact for all of them", CAP[c]);
    free(s);
}

/* eps = 0.1 * model_input + float32(sin(t / 100)), the fake model of gen_sched_golden.py */
static void fake_model(float *eps, const float *in, size_t n, double t) {
    float b = (float)sin(t / 100.0);
    for (size_t k = 0; k < n; k++) { float a = 0.1f * in[k]; eps[k] = a + b; }
}

static void test_trajectory(int c, MsSchedKind kind, const char *name, int N) {
    enum { n = 64 };                                  /* latent (1, 4, 4, 4) */
    SchedulerConfig cfg; ms_scheduler_config_sd15(&cfg);
    MsScheduler *s = (MsScheduler *)malloc(sizeof *s);
    float x[n], in[n], eps[n], work[n], after[5];
    char key[128], what[128];
    if (!s) { printf("out of memory\n"); exit(2); }
    if (ms_scheduler_init(s, kind, &cfg, CPU[c]) || ms_scheduler_set_timesteps(s, N)) {
        check(0, "%s %s init: %s", CAP[c], name, ms_last_error()); free(s); return;
    }
    snprintf(key, sizeof key, "%s/traj/%s/N%d", CAP[c], name, N);
    double *w = golden(key, (size_t)(s->num_steps + 1) * n);
    if (!w) { free(s); return; }
    MsTorchRng g, gen;                                /* default generator; DDPM's own */
    ms_torch_seed(&g, 0); ms_torch_seed(&gen, 123);
    ms_torch_randn(&g, x, n, CPU[c]);
    for (int k = 0; k < n; k++) x[k] = x[k] * s->init_noise_sigma;
    double worst = 0.0; int bits = 1, st_ok = 1;
    for (int i = 0; i <= s->num_steps; i++) {
        if (i > 0) {
            ms_scheduler_scale_model_input(s, i - 1, in, x, n);
            fake_model(eps, in, n, s->timesteps[i - 1]);
            st_ok &= ms_scheduler_step(s, i - 1, eps, x, work, n, kind == MS_SCHED_DDPM ? &gen : &g) == MS_OK;
        }
        float want[n];
        for (int k = 0; k < n; k++) want[k] = (float)w[(size_t)i * n + k];
        TestErr e = test_err_f(x, want, n);
        worst = fmax(worst, e.rel_l2);
        bits &= memcmp(x, want, sizeof want) == 0;
    }
    free(w);
    snprintf(what, sizeof what, "%s %s N=%d trajectory", CAP[c], name, N);
    /* Bit-exact where every op is float32 arithmetic or glibc libm, as torch's scalar paths;
     * AVX2 DPM-Solver's lambda_t comes from Sleef logs (see test_schedule): 1e-6 there. */
    if (c == 1 && kind == MS_SCHED_DPMSOLVER)
        check(st_ok && worst <= 1e-6, "%-44s worst step rel-L2 %.2e (tol 1e-6)%s", what, worst, bits ? ", bit-exact" : "");
    else
        check(st_ok && bits, "%-44s bit-exact at every step%s (worst rel-L2 %.2e)", what, bits ? "" : " -- NO", worst);
    ms_torch_randn(&g, after, 5, CPU[c]);              /* Euler's steps advanced g as torch's */
    snprintf(key, sizeof key, "%s/traj/%s/N%d/after", CAP[c], name, N);
    snprintf(what, sizeof what, "%s %s N=%d: generator state after", CAP[c], name, N);
    check_bits(what, after, key, 5);
    free(s);
}

static void test_add_noise(int c) {
    SchedulerConfig cfg; ms_scheduler_config_sd15(&cfg);
    MsScheduler *s = (MsScheduler *)malloc(sizeof *s);
    char key[128];
    if (!s) { printf("out of memory\n"); exit(2); }
    ms_scheduler_init(s, MS_SCHED_DDPM, &cfg, CPU[c]);
    double *x0 = NULL, *no = NULL, *tt = NULL;
    snprintf(key, sizeof key, "%s/add_noise/x0", CAP[c]); x0 = golden(key, 1024);
    snprintf(key, sizeof key, "%s/add_noise/noise", CAP[c]); no = golden(key, 1024);
    snprintf(key, sizeof key, "%s/add_noise/t", CAP[c]); tt = golden(key, 4);
    if (x0 && no && tt) {
        float fx[1024], fn[1024], out[1024]; int64_t t[4];
        for (int k = 0; k < 1024; k++) { fx[k] = (float)x0[k]; fn[k] = (float)no[k]; }
        for (int b = 0; b < 4; b++) t[b] = (int64_t)tt[b];
        check(ms_scheduler_add_noise(s, out, fx, fn, t, 4, 256) == MS_OK, "%s add_noise runs", CAP[c]);
        snprintf(key, sizeof key, "%s/add_noise/out", CAP[c]);
        char what[64]; snprintf(what, sizeof what, "%s DDPM add_noise t=0,1,500,999", CAP[c]);
        check_bits(what, out, key, 1024);
    }
    free(x0); free(no); free(tt); free(s);
}

static void test_errors(void) {
    SchedulerConfig cfg; ms_scheduler_config_sd15(&cfg);
    MsScheduler *s = (MsScheduler *)malloc(sizeof *s);
    float x[4] = { 0 }, e[4] = { 0 };
    int64_t t = 1000;
    if (!s) { printf("out of memory\n"); exit(2); }
    ms_scheduler_init(s, MS_SCHED_DDPM, &cfg, MS_TORCH_CPU_DEFAULT);
    check(ms_scheduler_set_timesteps(s, 0) == MS_ERR_ARG, "0 steps refused: %s", ms_last_error());
    check(ms_scheduler_set_timesteps(s, 1001) == MS_ERR_ARG, "1001 steps refused: %s", ms_last_error());
    check(ms_scheduler_add_noise(s, x, x, e, &t, 1, 4) == MS_ERR_ARG, "add_noise t=1000 refused: %s", ms_last_error());
    ms_scheduler_set_timesteps(s, 10);
    check(ms_scheduler_step(s, 10, e, x, x, 4, NULL) == MS_ERR_ARG, "step 10 of 10 refused: %s", ms_last_error());
    check(ms_scheduler_step(s, 0, e, x, NULL, 4, NULL) == MS_ERR_ARG, "DDPM step without generator refused: %s", ms_last_error());
    cfg.prediction_type = MS_PRED_V;
    check(ms_scheduler_init(s, MS_SCHED_DDIM, &cfg, MS_TORCH_CPU_DEFAULT) == MS_ERR_UNSUPPORTED,
          "v_prediction refused: %s", ms_last_error());
    ms_scheduler_config_sd15(&cfg); cfg.num_train_timesteps = 2000;
    check(ms_scheduler_init(s, MS_SCHED_DDIM, &cfg, MS_TORCH_CPU_DEFAULT) == MS_ERR_UNSUPPORTED,
          "2000 train steps refused: %s", ms_last_error());
    free(s);
}

int main(void) {
    test_mt19937();
    test_errors();
    const char *path = "tests/data/sched_golden.safetensors";
    if (st_open(&G, path) != MS_OK) {
        check(0, "open %s: %s", path, ms_last_error());
        return test_summary("test_schedulers");
    }
    test_randn_simd();
    for (int c = 0; c < 2; c++) {
        MsSimd top = ms_simd();                    /* the goldens at every SIMD level */
        for (int l = MS_SIMD_SCALAR; l < (int)top; l++) {
            ms_set_simd((MsSimd)l);
            if (ms_simd() == (MsSimd)l) test_torch_randn(c);
        }
        ms_set_simd(top);
        test_torch_randn(c);
        test_schedule(c);
        test_timesteps(c);
        test_trajectory(c, MS_SCHED_DDPM, "ddpm", 10);
        test_trajectory(c, MS_SCHED_DDIM, "ddim", 10);
        test_trajectory(c, MS_SCHED_EULER, "euler", 10);
        test_trajectory(c, MS_SCHED_EULER, "euler", 25);
        test_trajectory(c, MS_SCHED_DPMSOLVER, "dpm", 10);
        test_trajectory(c, MS_SCHED_DPMSOLVER, "dpm", 20);
        test_add_noise(c);
    }
    st_close(&G);
    return test_summary("test_schedulers");
}
