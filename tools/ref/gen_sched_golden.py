#!/usr/bin/python3
"""Golden tensors for models/schedulers.c: torch.randn and the diffusers 0.19.3 schedulers.

Writes tests/data/sched_golden.safetensors (read by tests/test_schedulers.c). Run with Debian's
python3-torch (torch 1.13) and numpy:

    git clone --depth 1 --branch v0.19.3 https://github.com/huggingface/diffusers /tmp/diffusers-0.19.3
    /usr/bin/python3 tools/ref/gen_sched_golden.py [--diffusers /tmp/diffusers-0.19.3/src]

diffusers' package __init__ needs huggingface_hub, requests, tqdm, packaging; they are stubbed
below and only the scheduler modules are imported (nothing of diffusers is vendored here).

torch picks CPU kernels per instruction set at run time, and torch.randn and torch.linspace
give different last bits with the default (scalar libm) and the AVX2 kernels. The script runs
itself once per ATEN_CPU_CAPABILITY (default, avx2) and stores both under "<cap>/..." keys.
Everything is deterministic: seeds are in the metadata and in the key names.
"""
import argparse, json, math, os, subprocess, sys, tempfile, types, re
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import stub_diffusers, write_safetensors  # noqa: E402

SD15_SCHEDULER = {  # /work/shared/models/sd15-configs/scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
RNG_SEEDS = [0, 42, 2**32 + 5]
RNG_SHAPES = [(1,), (3,), (15,), (16,), (17,), (33,), (2, 4, 8, 8), (1, 4, 64, 64)]
BIG = 1024          # tensors above this many elements are stored as head, tail and FNV-1a
STEPS = [1, 10, 20, 25, 50]
SPACINGS = [None, "linspace", "leading", "trailing"]   # None: the config's (no key)
KINDS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
         "dpm": "DPMSolverMultistepScheduler"}
MODULES = {"ddpm": "scheduling_ddpm", "ddim": "scheduling_ddim", "euler": "scheduling_euler_discrete",
           "dpm": "scheduling_dpmsolver_multistep"}
TRAJ = [("ddpm", 10), ("ddim", 10), ("euler", 10), ("euler", 25), ("dpm", 10), ("dpm", 20)]


def fnv1a64(a):
    h = 0xcbf29ce484222325
    for byte in np.ascontiguousarray(a, dtype="<f4").tobytes():
        h = ((h ^ byte) * 0x100000001b3) & 0xffffffffffffffff
    return np.array([h], dtype=np.uint64).view(np.int64)


def import_schedulers(src):
    """Import diffusers.schedulers.scheduling_* without diffusers' package __init__."""
    stub_diffusers(src, ['schedulers'])
    import importlib
    return {k: getattr(importlib.import_module("diffusers.schedulers." + MODULES[k]), KINDS[k]) for k in KINDS}


def worker(src, out_path):
    import torch
    torch.set_num_threads(1)
    classes = import_schedulers(src)
    T = {}

    # ---- torch.randn with the default generator, then again (the state advances) ----
    for seed in RNG_SEEDS:
        for shape in RNG_SHAPES:
            torch.manual_seed(seed)
            a = torch.randn(shape).numpy().ravel()
            b = torch.randn(shape).numpy().ravel()
            name = "rng/s%d/%s" % (seed, "x".join(map(str, shape)))
            for tag, x in (("first", a), ("second", b)):
                if x.size > BIG:
                    T[name + "/" + tag + "_head"] = x[:256].copy()
                    T[name + "/" + tag + "_tail"] = x[-256:].copy()
                    T[name + "/" + tag + "_fnv"] = fnv1a64(x)
                else:
                    T[name + "/" + tag] = x.copy()
    # a run of sizes under and over 16: the cached Box-Muller sample crosses calls
    torch.manual_seed(7)
    T["rng/seq_s7_3_16_1_17_2"] = np.concatenate([torch.randn(n).numpy() for n in (3, 16, 1, 17, 2)])
    # torch.Generator objects draw exactly like the default one
    g = torch.Generator().manual_seed(42)
    x = torch.cat([torch.randn((2, 4, 8, 8), generator=g).ravel(), torch.randn(3, generator=g)])
    torch.manual_seed(42)
    y = torch.cat([torch.randn((2, 4, 8, 8)).ravel(), torch.randn(3)])
    assert torch.equal(x, y), "torch.Generator and the default generator differ"
    T["rng/gen_s42_512_3"] = x.numpy()
    # raw words: torch.randint over the full 32-bit range is not one word per value, so check
    # random() through uniform_(0, 1) on a float tensor: (word & 0xffffff) * 2^-24
    torch.manual_seed(5489)
    T["rng/uniform_s5489_8"] = torch.empty(8).uniform_(0, 1).numpy()

    # ---- noise schedules ----
    cfg = dict(SD15_SCHEDULER)
    dpm = classes["dpm"].from_config(cfg)
    T["sched/betas"] = dpm.betas.numpy()
    T["sched/alphas_cumprod"] = dpm.alphas_cumprod.numpy()
    T["sched/dpm_alpha_t"] = dpm.alpha_t.numpy()
    T["sched/dpm_sigma_t"] = dpm.sigma_t.numpy()
    T["sched/dpm_lambda_t"] = dpm.lambda_t.numpy()

    # ---- timesteps ----
    for kind, cls in classes.items():
        for sp in SPACINGS:
            c = dict(cfg)
            if sp is not None:
                c["timestep_spacing"] = sp
            for n in STEPS:
                s = cls.from_config(c)
                s.set_timesteps(n)
                key = "ts/%s/%s/N%d" % (kind, sp or "config", n)
                T[key] = s.timesteps.numpy().astype(np.float64)
                if kind == "euler":
                    T[key + "/sigmas"] = s.sigmas.numpy().astype(np.float32)
                    T[key + "/init_noise_sigma"] = np.array([float(s.init_noise_sigma)], np.float32)

    # ---- trajectories: fake model eps = 0.1 * model_input + sin(t / 100) ----
    for kind, n in TRAJ:
        s = classes[kind].from_config(cfg)
        s.set_timesteps(n)
        torch.manual_seed(0)
        x = torch.randn((1, 4, 4, 4)) * s.init_noise_sigma
        gen = torch.Generator().manual_seed(123)
        rows = [x.numpy().ravel().copy()]
        for t in s.timesteps:
            inp = s.scale_model_input(x, t)
            eps = 0.1 * inp + torch.tensor(np.float32(math.sin(float(t) / 100.0)))
            kw = {"generator": gen} if kind == "ddpm" else {}   # Euler draws from the default one
            x = s.step(eps, t, x, **kw).prev_sample
            rows.append(x.numpy().ravel().copy())
        T["traj/%s/N%d" % (kind, n)] = np.stack(rows)
        T["traj/%s/N%d/after" % (kind, n)] = torch.randn(5).numpy()   # where the default generator is

    # ---- DDPM add_noise (training) ----
    s = classes["ddpm"].from_config(cfg)
    torch.manual_seed(1)
    x0 = torch.randn((4, 4, 8, 8)); noise = torch.randn((4, 4, 8, 8))
    t = torch.tensor([0, 1, 500, 999])
    T["add_noise/x0"] = x0.numpy(); T["add_noise/noise"] = noise.numpy()
    T["add_noise/t"] = t.numpy().astype(np.int64)
    T["add_noise/out"] = s.add_noise(x0, noise, t).numpy()

    np.savez(out_path, **T)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data",
                                                  "sched_golden.safetensors"))
    ap.add_argument("--worker", nargs=2, metavar=("CAPABILITY", "NPZ"))
    args = ap.parse_args()
    if args.worker:
        worker(args.diffusers, args.worker[1])
        return
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cap in ("default", "avx2"):
            npz = os.path.join(tmp, cap + ".npz")
            env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
            subprocess.run([sys.executable, __file__, "--diffusers", args.diffusers, "--worker", cap, npz],
                           env=env, check=True)
            with np.load(npz) as z:
                for k in z.files:
                    tensors[cap + "/" + k] = z[k]
    import torch
    meta = {"generator": "tools/ref/gen_sched_golden.py", "torch": torch.__version__,
            "numpy": np.__version__, "diffusers": "0.19.3", "rng_seeds": json.dumps(RNG_SEEDS),
            "trajectory": "latent torch.manual_seed(0) randn(1,4,4,4) * init_noise_sigma; "
                          "eps = 0.1 * scale_model_input(x) + float32(sin(t / 100)); DDPM noise "
                          "torch.Generator().manual_seed(123); Euler noise from the default generator",
            "scheduler_config": json.dumps(SD15_SCHEDULER),
            "capabilities": "default = ATEN_CPU_CAPABILITY=default, avx2 = ATEN_CPU_CAPABILITY=avx2"}
    write_safetensors(args.out, tensors, meta)
    print("wrote %s: %d tensors, %d bytes" % (args.out, len(tensors), os.path.getsize(args.out)))


if __name__ == "__main__":
    main()
