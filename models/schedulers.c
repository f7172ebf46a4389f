/* models/schedulers.c — torch-identical CPU random numbers and the diffusers 0.19.3 schedulers
 * (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler) that
 * Stable Diffusion 1.x training and sampling use.
 *
 * Reference: torch 1.13 (aten/src/ATen/core/{MT19937RNGEngine.h,DistributionsHelper.h,
 * TransformationHelper.h}, aten/src/ATen/native/cpu/{DistributionTemplates.h,avx_mathfun.h},
 * RangeFactoriesKernel.cpp, ReduceOpsKernel.cpp cumprod) and diffusers 0.19.3
 * src/diffusers/schedulers/scheduling_{ddpm,ddim,euler_discrete,dpmsolver_multistep}.py.
 * Every number here is the float32 (or float64 where numpy works in it) operation sequence of
 * those sources, so samples match torch to the last bit where the libm calls agree
 * (tests/test_schedulers.c against tools/ref/gen_sched_golden.py).
 */
#include "mixshow.h"

#include <inttypes.h>
#include <math.h>
#include <string.h>

/* No a*b+c may become an fma: torch rounds every op. gcc in ISO C mode (-std=c11) does not
 * contract; clang does within an expression unless told. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ---------------------------------------------------------------------------------------- */
/* Torch-identical CPU generator: mt19937 + torch.randn                                      */
/* ---------------------------------------------------------------------------------------- */
/* MT19937 (Matsumoto & Nishimura 1998) as at::mt19937 implements it: the 64-bit seed is cut to
 * its low 32 bits (torch.manual_seed(2**32 + 5) == torch.manual_seed(5)), the standard
 * init_genrand recurrence fills the state, and outputs are the standard tempered words. */
enum { MT_N = 624, MT_M = 397 };

void ms_torch_seed(MsTorchRng *g, uint64_t seed) {
    g->seed = seed;
    g->mt[0] = (uint32_t)(seed & 0xffffffffu);
    for (int j = 1; j < MT_N; j++)
        g->mt[j] = 1812433253u * (g->mt[j - 1] ^ (g->mt[j - 1] >> 30)) + (uint32_t)j;
    g->next = MT_N;                  /* regenerate the block on the first draw */
    g->has_normal = 0;
    g->normal = 0.0;
}

static void mt_twist(MsTorchRng *g) {
    ms_mt19937_twist(g->mt);                 /* tensor.c: SIMD, the bits of the definition */
    g->next = 0;
}

uint32_t ms_torch_random(MsTorchRng *g) {
    if (g->next >= MT_N) mt_twist(g);
    uint32_t y = g->mt[g->next++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* CPUGeneratorImpl::random64: the first 32-bit draw is the HIGH word. */
uint64_t ms_torch_random64(MsTorchRng *g) {
    uint64_t hi = ms_torch_random(g);
    uint64_t lo = ms_torch_random(g);
    return (hi << 32) | lo;
}

/* at::uniform_real_distribution<double>(0, 1): the low 53 bits of random64() times 2^-53 (the
 * float version, the low 24 bits of one draw times 2^-24, is ms_mt_uniform24 in tensor.c). */
static double torch_uniform_double(MsTorchRng *g) {
    return (double)(ms_torch_random64(g) & 0x1fffffffffffffu) * (1.0 / 9007199254740992.0);
}

/* at::normal_distribution<double>(0, 1), the path of tensors with fewer than 16 elements:
 * Box-Muller on two uniform doubles; the sine half is cached in the generator and returned by
 * the next call (also by a later torch.randn: the cache lives as long as the generator). */
static double torch_normal_double(MsTorchRng *g) {
    if (g->has_normal) { g->has_normal = 0; return g->normal * 1.0 + 0.0; }
    double u1 = torch_uniform_double(g);
    double u2 = torch_uniform_double(g);
    double r = sqrt(-2.0 * log(1.0 - u2));
    double theta = 2.0 * MS_PI * u1;
    g->normal = r * sin(theta);
    g->has_normal = 1;
    return r * cos(theta) * 1.0 + 0.0;
}

/* n uniform floats (uniform_real_distribution<float>), one per state word, in runs up to the
 * next refill. */
static void torch_uniform_fill(MsTorchRng *g, float *out, size_t n) {
    while (n) {
        if (g->next >= MT_N) mt_twist(g);
        size_t k = (size_t)(MT_N - g->next);
        if (k > n) k = n;
        ms_mt_uniform24(out, g->mt + g->next, k);
        g->next += (int)k;
        out += k;
        n -= k;
    }
}

/* torch.randn, n >= 16 (DistributionTemplates.h normal_fill): n uniforms, then normal_fill_16
 * on each whole block of 16 (tensor.c: the AVX2 kernel's avx_mathfun log/sincos, or the
 * default kernel's libm); when 16 does not divide n, the last 16 values are drawn anew and
 * computed again (torch's tail). */
void ms_torch_randn(MsTorchRng *g, float *out, size_t n, MsTorchCpu cpu) {
    const int avx = cpu == MS_TORCH_CPU_AVX2;
    if (n < 16) {                                         /* scalar normal_distribution<double> */
        for (size_t i = 0; i < n; i++) out[i] = (float)torch_normal_double(g);
        return;
    }
    torch_uniform_fill(g, out, n);
    ms_torch_normal16(out, n / 16, avx);
    if (n % 16 != 0) {
        float *tail = out + n - 16;
        torch_uniform_fill(g, tail, 16);
        ms_torch_normal16(tail, 1, avx);
    }
}

/* The same draws without the values: only the state advances (n + 16 words when 16 does not
 * divide n, as above; n < 16: the double path, which may use the cached sample). */
void ms_torch_randn_skip(MsTorchRng *g, size_t n) {
    if (n < 16) { for (size_t i = 0; i < n; i++) (void)torch_normal_double(g); return; }
    size_t draws = n + (n % 16 ? 16 : 0);
    while (draws) {
        if (g->next >= MT_N) mt_twist(g);
        size_t k = (size_t)(MT_N - g->next);
        if (k > draws) k = draws;
        g->next += (int)k;
        draws -= k;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Noise schedule                                                                            */
/* ---------------------------------------------------------------------------------------- */
/* torch.linspace(start, end, n, dtype=float32) on the CPU (RangeFactoriesKernel.cpp): step =
 * (end - start) / (n - 1) in float; the first half counts up from start, the second half down
 * from end. The kernel writes blocks of 8 with Vectorized::arange(base, step) = base + k*step,
 * base taken at the block's first index (a block straddling n/2 counts up from start), and
 * the last n % 16 values one at a time. The AVX2 build is compiled with FMA contraction, so
 * there base = fma(step, idx, start); the default build rounds step*idx first. Both are
 * checked bit for bit against torch (tests/test_schedulers.c). */
static float linspace_at(float start, float end, float step, int64_t idx, int64_t n, int fused) {
    if (idx < n / 2) return fused ? fmaf(step, (float)idx, start) : start + step * (float)idx;
    return fused ? fmaf(-step, (float)(n - idx - 1), end) : end - step * (float)(n - idx - 1);
}

static void torch_linspace_f32(float *out, double start_d, double end_d, int64_t n, MsTorchCpu cpu) {
    float start = (float)start_d, end = (float)end_d;
    int fused = cpu == MS_TORCH_CPU_AVX2;
    if (n == 1) { out[0] = start; return; }
    float step = (end - start) / (float)(n - 1);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)                 /* two vectors of 8 per turn of the loop */
        for (int64_t b = i; b < i + 16; b += 8) {
            float base = linspace_at(start, end, step, b, n, fused);
            for (int k = 0; k < 8; k++) out[b + k] = fused ? fmaf((float)k, step, base) : base + (float)k * step;
        }
    for (; i < n; i++) out[i] = linspace_at(start, end, step, i, n, fused);
}

/* betas_for_alpha_bar (squaredcos_cap_v2, Nichol & Dhariwal 2021 Eq. 17), in Python floats
 * then float32: min(1 - abar((i+1)/T) / abar(i/T), 0.999), abar(t) = cos((t+0.008)/1.008 pi/2)^2 */
static double alpha_bar_cos(double t) {
    double c = cos((t + 0.008) / 1.008 * MS_PI / 2.0);
    return c * c;
}

MsStatus ms_scheduler_init(MsScheduler *s, MsSchedKind kind, const SchedulerConfig *c, MsTorchCpu cpu) {
    MsStatus st = ms_scheduler_config_check(c);
    if (st) return st;
    int T = c->num_train_timesteps;
    if (T < 2 || T > MS_SCHED_MAX_T)
        return ms_errorf(MS_ERR_UNSUPPORTED, "scheduler: num_train_timesteps %d (supported: 2..%d)", T, MS_SCHED_MAX_T);
    if (c->prediction_type != MS_PRED_EPSILON)
        return ms_errorf(MS_ERR_UNSUPPORTED, "scheduler: prediction_type %d (only epsilon is implemented)",
                         (int)c->prediction_type);
    if ((int)kind < MS_SCHED_DDPM || (int)kind > MS_SCHED_DPMSOLVER)
        return ms_errorf(MS_ERR_ARG, "scheduler: unknown kind %d", (int)kind);
    memset(s, 0, sizeof *s);
    s->kind = kind;
    s->cfg = *c;
    s->torch_cpu = cpu;
    s->T = T;
    s->spacing = c->timestep_spacing;
    if (s->spacing == MS_SPACING_ABSENT)
        s->spacing = (kind == MS_SCHED_DDPM || kind == MS_SCHED_DDIM) ? MS_SPACING_LEADING : MS_SPACING_LINSPACE;
    /* betas (every class's __init__): linspace in float32; scaled_linear squares a linspace of
     * the square roots (beta_start**0.5 in Python double; pow 2 is x*x in torch). */
    if (c->beta_schedule == MS_BETA_SCALED_LINEAR) {
        torch_linspace_f32(s->betas, sqrt(c->beta_start), sqrt(c->beta_end), T, cpu);
        for (int t = 0; t < T; t++) s->betas[t] = s->betas[t] * s->betas[t];
    } else if (c->beta_schedule == MS_BETA_LINEAR) {
        torch_linspace_f32(s->betas, c->beta_start, c->beta_end, T, cpu);
    } else {
        for (int t = 0; t < T; t++) {
            double b = 1.0 - alpha_bar_cos((double)(t + 1) / T) / alpha_bar_cos((double)t / T);
            s->betas[t] = (float)(b < 0.999 ? b : 0.999);
        }
    }
    /* alphas = 1 - betas in float; torch.cumprod on the CPU accumulates in double
     * (at::acc_type<float, false> is double) and rounds each prefix product to float. */
    double acc = 1.0;
    for (int t = 0; t < T; t++) {
        acc *= (double)(1.0f - s->betas[t]);
        s->alphas_cumprod[t] = (float)acc;
    }
    /* DPM-Solver: alpha_t = sqrt(ac), sigma_t = sqrt(1 - ac), lambda_t = log(alpha_t) -
     * log(sigma_t), all float32. AVX2 torch takes these logs with Sleef (<= 1 ulp from libm). */
    for (int t = 0; t < T; t++) {
        s->alpha_t[t] = sqrtf(s->alphas_cumprod[t]);
        s->sigma_t[t] = sqrtf(1.0f - s->alphas_cumprod[t]);
        s->lambda_t[t] = logf(s->alpha_t[t]) - logf(s->sigma_t[t]);
    }
    s->final_alpha_cumprod = c->set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
    s->init_noise_sigma = 1.0f;
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Timesteps                                                                                 */
/* ---------------------------------------------------------------------------------------- */
/* np.linspace(0, stop, num) in float64 (numpy 1.24): i * (stop / (num - 1)) + 0, the last
 * value set to stop exactly; num == 1 gives [0]. */
static double np_linspace_at(double stop, int num, int i) {
    if (num == 1) return 0.0;
    if (i == num - 1) return stop;
    return (double)i * (stop / (double)(num - 1)) + 0.0;
}

/* np.arange(start, 0, -step) in float64: ceil(-start / -step) values; numpy writes start,
 * start + (-step), then start + i*delta with delta = (start - step) - start. Returns the count. */
static int np_arange_down(double *out, int cap, double start, double step) {
    double len_d = ceil((0.0 - start) / -step);
    int len = len_d > 0 ? (int)len_d : 0;
    if (len > cap) len = cap;
    double second = start + -step, delta = second - start;
    for (int i = 0; i < len; i++) out[i] = i == 0 ? start : i == 1 ? second : start + (double)i * delta;
    return len;
}

/* numpy's round(): half to even, the default rounding mode of nearbyint. */
static double np_round(double x) { return nearbyint(x); }

MsStatus ms_scheduler_set_timesteps(MsScheduler *s, int N) {
    int T = s->T;
    if (N < 1 || N > T)
        return ms_errorf(MS_ERR_ARG, "scheduler: %d inference steps (expected 1..%d)", N, T);
    MsTimestepSpacing sp = s->spacing;
    double *ts = s->timesteps;
    int n = 0, off = s->cfg.steps_offset;
    s->num_inference_steps = N;
    if (s->kind != MS_SCHED_DPMSOLVER) {
        /* DDPM, DDIM (scheduling_ddim.py:321-339), Euler (scheduling_euler_discrete.py:224-239):
         * Euler keeps float64 timesteps, the others round to int64 */
        if (sp == MS_SPACING_LINSPACE) {
            for (int i = 0; i < N; i++) {
                double v = np_linspace_at((double)(T - 1), N, N - 1 - i);
                ts[i] = s->kind == MS_SCHED_EULER ? v : np_round(v);
            }
            n = N;
        } else if (sp == MS_SPACING_LEADING) {
            int ratio = T / N;
            for (int i = 0; i < N; i++) ts[i] = (double)((int64_t)(N - 1 - i) * ratio + off);
            n = N;
        } else {
            n = np_arange_down(ts, T + 1, (double)T, (double)T / (double)N);
            for (int i = 0; i < n; i++) ts[i] = np_round(ts[i]) - 1.0;
        }
    } else {
        /* DPM-Solver (scheduling_dpmsolver_multistep.py:243-282). lambda_min_clipped = -inf
         * clips nothing: last_timestep = T. linspace takes N + 1 points and drops the final 0;
         * steps_offset is ignored there. Then np.unique keeps first occurrences. */
        if (sp == MS_SPACING_LINSPACE) {
            for (int i = 0; i < N; i++) ts[i] = np_round(np_linspace_at((double)(T - 1), N + 1, N - i));
            n = N;
        } else if (sp == MS_SPACING_LEADING) {
            int ratio = T / (N + 1);
            for (int i = 0; i < N; i++) ts[i] = (double)((int64_t)(N - i) * ratio + off);
            n = N;
        } else {
            n = np_arange_down(ts, T + 1, (double)T, (double)T / (double)N);
            for (int i = 0; i < n; i++) ts[i] = np_round(ts[i]) - 1.0;
        }
        int m = 0;
        for (int i = 0; i < n; i++) {
            int dup = 0;
            for (int j = 0; j < m; j++) dup |= ts[j] == ts[i];
            if (!dup) ts[m++] = ts[i];
        }
        n = m;
    }
    s->num_steps = n;
    for (int i = 0; i < n; i++)
        if (!(ts[i] >= 0.0) || !(ts[i] <= (double)(T - 1)))
            return ms_errorf(MS_ERR_ARG, "scheduler: timestep %g out of [0, %d] (%d steps, spacing %d)",
                             ts[i], T - 1, N, (int)sp);
    s->lower_order_nums = 0;
    s->init_noise_sigma = 1.0f;
    if (s->kind == MS_SCHED_EULER) {
        /* sigmas = ((1 - ac) / ac) ** 0.5 in float32 (torch), np.interp at the float64 timesteps,
         * cast to float32, then a final 0 (scheduling_euler_discrete.py:245-263). */
        float train_sigma[MS_SCHED_MAX_T];
        for (int t = 0; t < T; t++) train_sigma[t] = sqrtf((1.0f - s->alphas_cumprod[t]) / s->alphas_cumprod[t]);
        for (int i = 0; i < n; i++) {
            double x = ts[i];
            int j = (int)floor(x);
            double v;
            if (j >= T - 1) v = train_sigma[T - 1];
            else if ((double)j == x) v = train_sigma[j];
            else {                                           /* numpy: slope*(x - xp[j]) + fp[j] */
                double slope = ((double)train_sigma[j + 1] - (double)train_sigma[j]) / 1.0;
                v = slope * (x - (double)j) + (double)train_sigma[j];
            }
            s->sigmas[i] = (float)v;
        }
        s->sigmas[n] = 0.0f;
        float smax = 0.0f;
        for (int i = 0; i <= n; i++) if (s->sigmas[i] > smax) smax = s->sigmas[i];
        /* init_noise_sigma (:181-186): max sigma, or sqrt(max^2 + 1) for "leading" */
        s->init_noise_sigma = sp == MS_SPACING_LEADING ? sqrtf(smax * smax + 1.0f) : smax;
    }
    return MS_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Steps. Every line is one torch op on float32 (0-d tensors for the coefficients), in the     */
/* order diffusers writes it; products are never fused (see the pragma at the top).          */
/* ---------------------------------------------------------------------------------------- */
void ms_scheduler_scale_model_input(const MsScheduler *s, int i, float *out, const float *x, size_t n) {
    if (s->kind == MS_SCHED_EULER) {                  /* sample / ((sigma**2 + 1) ** 0.5) */
        float sigma = s->sigmas[i];
        float d = sqrtf(sigma * sigma + 1.0f);
        for (size_t k = 0; k < n; k++) out[k] = x[k] / d;
    } else if (out != x) {
        memcpy(out, x, n * sizeof *out);
    }
}

/* pred_original_sample for epsilon prediction: (x - sqrt(1 - ac_t) * eps) / sqrt(ac_t), clipped
 * to +-clip_sample_range when clip_sample. */
static float x0_from_eps(float x, float eps, float sqrt_beta, float sqrt_alpha, int clip, float range) {
    float sb = sqrt_beta * eps;
    float x0 = (x - sb) / sqrt_alpha;
    if (clip) x0 = x0 < -range ? -range : x0 > range ? range : x0;
    return x0;
}

MsStatus ms_scheduler_step(MsScheduler *s, int i, const float *eps, float *x, float *work, size_t n,
                           MsTorchRng *rng) {
    if (i < 0 || i >= s->num_steps)
        return ms_errorf(MS_ERR_ARG, "scheduler step %d: outside 0..%d (call set_timesteps first)", i, s->num_steps - 1);
    int T = s->T, N = s->num_inference_steps;
    int clip = s->cfg.clip_sample;
    float range = (float)s->cfg.clip_sample_range;

    if (s->kind == MS_SCHED_DDPM) {
        /* DDPMScheduler.step, variance_type fixed_small (scheduling_ddpm.py:358-452) */
        int t = (int)s->timesteps[i], prev_t = t - T / N;
        if (t > 0 && (!rng || !work))
            return ms_errorf(MS_ERR_ARG, "DDPM step %d (t=%d): needs a generator and n floats of work", i, t);
        float apt = s->alphas_cumprod[t], app = prev_t >= 0 ? s->alphas_cumprod[prev_t] : 1.0f;
        float bpt = 1.0f - apt, bpp = 1.0f - app;
        float cur_alpha = apt / app, cur_beta = 1.0f - cur_alpha;
        float sq_bpt = sqrtf(bpt), sq_apt = sqrtf(apt);
        float c_x0 = (sqrtf(app) * cur_beta) / bpt;                 /* pred_original_sample_coeff */
        float c_x = (sqrtf(cur_alpha) * bpp) / bpt;                 /* current_sample_coeff */
        float stdv = 0.0f;
        if (t > 0) {
            ms_torch_randn(rng, work, n, s->torch_cpu);           /* variance_noise */
            float var = (1.0f - app) / (1.0f - apt);                /* _get_variance */
            var = var * (1.0f - apt / app);
            if (var < 1e-20f) var = 1e-20f;                         /* clamp(min=1e-20) */
            stdv = sqrtf(var);
        }
        for (size_t k = 0; k < n; k++) {
            float x0 = x0_from_eps(x[k], eps[k], sq_bpt, sq_apt, clip, range);
            float a = c_x0 * x0, b = c_x * x[k];
            float prev = a + b;
            float v = t > 0 ? stdv * work[k] : 0.0f;                /* `+ variance` (0 at t=0) */
            prev = prev + v;
            x[k] = prev;
        }
    } else if (s->kind == MS_SCHED_DDIM) {
        /* DDIMScheduler.step with eta 0 (scheduling_ddim.py:401-447): std_dev_t = 0 */
        int t = (int)s->timesteps[i], prev_t = t - T / N;
        float apt = s->alphas_cumprod[t];
        float app = prev_t >= 0 ? s->alphas_cumprod[prev_t] : s->final_alpha_cumprod;
        float sq_bpt = sqrtf(1.0f - apt), sq_apt = sqrtf(apt);
        float c_dir = sqrtf((1.0f - app) - 0.0f), sq_app = sqrtf(app);
        for (size_t k = 0; k < n; k++) {
            float x0 = x0_from_eps(x[k], eps[k], sq_bpt, sq_apt, clip, range);
            float dir = c_dir * eps[k];
            float a = sq_app * x0;
            x[k] = a + dir;
        }
    } else if (s->kind == MS_SCHED_EULER) {
        /* EulerDiscreteScheduler.step, s_churn 0 (scheduling_euler_discrete.py:364-399): the
         * noise is drawn (randn_tensor, :369) even though gamma = 0 never uses it. */
        if (rng) ms_torch_randn_skip(rng, n);
        float sigma_hat = s->sigmas[i] * (0.0f + 1.0f);
        float dt = s->sigmas[i + 1] - sigma_hat;
        for (size_t k = 0; k < n; k++) {
            float se = sigma_hat * eps[k];
            float x0 = x[k] - se;
            float deriv = (x[k] - x0) / sigma_hat;
            float d = deriv * dt;
            x[k] = x[k] + d;
        }
    } else {
        /* DPMSolverMultistepScheduler.step (scheduling_dpmsolver_multistep.py:633-709):
         * data prediction m0 = (x - sigma_s0 eps) / alpha_s0; first order on the first step and,
         * when there are fewer than 15 steps, on the last; second order (midpoint) otherwise:
         *   h = lambda_t - lambda_s0, r0 = (lambda_s0 - lambda_s1) / h, D1 = (m0 - m1) / r0
         *   x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m0 - 0.5 alpha_t (e^-h - 1) D1
         * The final step goes to t = 0 with alphas_cumprod[0], not to 1. */
        if (!work) return ms_errorf(MS_ERR_ARG, "DPM-Solver step %d: needs n floats of work", i);
        int ns = s->num_steps;
        int t = (int)s->timesteps[i], tp = i == ns - 1 ? 0 : (int)s->timesteps[i + 1];
        int lower_final = i == ns - 1 && ns < 15;
        float sig_s0 = s->sigma_t[t], alp_s0 = s->alpha_t[t];
        float h = s->lambda_t[tp] - s->lambda_t[t];
        float c_x = s->sigma_t[tp] / sig_s0;
        float em1 = expf(-h) - 1.0f;
        float c_d0 = s->alpha_t[tp] * em1;
        if (s->lower_order_nums < 1 || lower_final) {
            for (size_t k = 0; k < n; k++) {
                float se = sig_s0 * eps[k];
                float m0 = (x[k] - se) / alp_s0;
                float a = c_x * x[k], b = c_d0 * m0;
                x[k] = a - b;
                work[k] = m0;
            }
        } else {
            int t1 = (int)s->timesteps[i - 1];
            float h0 = s->lambda_t[t] - s->lambda_t[t1];
            float r0 = h0 / h;
            float inv_r0 = 1.0f / r0;
            float c_d1 = 0.5f * c_d0;
            for (size_t k = 0; k < n; k++) {
                float se = sig_s0 * eps[k];
                float m0 = (x[k] - se) / alp_s0;
                float dm = m0 - work[k];
                float d1 = inv_r0 * dm;
                float a = c_x * x[k], b = c_d0 * m0;
                float ab = a - b;
                float c = c_d1 * d1;
                x[k] = ab - c;
                work[k] = m0;
            }
        }
        if (s->lower_order_nums < 2) s->lower_order_nums++;
    }
    return MS_OK;
}

MsStatus ms_scheduler_add_noise(const MsScheduler *s, float *out, const float *x0, const float *noise,
                                const int64_t *t, int B, size_t m) {
    for (int b = 0; b < B; b++) {
        if (t[b] < 0 || t[b] >= s->T)
            return ms_errorf(MS_ERR_ARG, "add_noise: timestep %" PRId64 " of sample %d outside [0, %d)",
                             t[b], b, s->T);
        float ac = s->alphas_cumprod[t[b]];
        float sa = sqrtf(ac), sb = sqrtf(1.0f - ac);
        for (size_t k = (size_t)b * m; k < (size_t)(b + 1) * m; k++) {
            float u = sa * x0[k], v = sb * noise[k];
            out[k] = u + v;
        }
    }
    return MS_OK;
}
