#!/usr/bin/python3
"""PyTorch timings of the network cases of `mixshow bench --nets`, printed in the same format.

    /usr/bin/python3 tools/ref/bench_torch.py [--nets unet,vae,text] [--runs 3] [--threads 1,2]
        [--ours OUT.txt] [--blas DIR] [--diffusers /tmp/diffusers-0.19.3/src]
        [--transformers /tmp/clip_hf/src]

Cases (random weights, SD 1.5 configs from /work/shared/models/sd15-configs, float32):
  unet sd15 B=2 64x64            UNet2DConditionModel (diffusers 0.19.3) forward, t = 999,
                                 context (2, 77, 768): one classifier-free-guidance step
  vae-decode sd15 512x512        AutoencoderKL.decode of a (1, 4, 64, 64) latent
  train sd15 B=1 64x64           (only when named: --nets train) one optimizer step of the OFFICIAL
                                 Mix-of-Show trainer (EDLoRATrainer of --mos, imported unchanged via
                                 gen_train_golden.install_shims; train_edlora.py's loop body:
                                 forward, backward, AdamW, lr step, embedding restore) with the 8101
                                 potter config's options (2 words x 16 tokens, rank-4 LoRA on every
                                 attention Linear of UNet and text encoder, noise offset, attention
                                 regularisation, mask loss; enable_xformers off: CPU), batch
                                 --train-batch, 512x512, random SD 1.5 weights (from_pretrained
                                 replaced by the random init below); one warm-up step first. Its
                                 child runs without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE.
  text-encoder sd15 [16,77]      CLIPTextModel (transformers 4.31) forward, and forward+backward
                                 with rank-4 LoRA (alpha 1) on q/k/v/out_proj added by forward
                                 hooks (Mix-of-Show's y = W x + b + up(down(x))) and the gradient
                                 flowing down to the embedding output (mixshow: to 2 new rows)
Every weight of rank >= 2 is U(-a, a), a = sqrt(3 / fan_in); norm scales 1, biases 0 (as
mixshow's bench). Forward cases run under torch.no_grad(); each time is the median of --runs
calls (no separate warm-up, as mixshow). Each (case, thread count) runs in a fresh process with
OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = n and torch.set_num_threads(n), so its peak RSS
(ru_maxrss) is its own.

Imports: diffusers' modules are imported (not copied) with its missing packages stubbed, through
tools/ref/gen_vae_golden.py's import_diffusers(); transformers' through gen_clip_golden.py's
import_transformers(). diffusers 0.19.3 on torch 1.13 uses AttnProcessor (baddbmm, softmax,
bmm: the full (T, T) attention matrix), since F.scaled_dot_product_attention arrived in torch 2.0.

BLAS: Debian's python3-torch calls libblas.so.3 for every matmul (Linear, bmm); on this machine
that alternative is netlib's reference BLAS, which is very slow. --blas DIR puts DIR first on
LD_LIBRARY_PATH of the child processes, e.g. an unpacked Debian libopenblas0-openmp
(`apt-get download libopenblas0-openmp; dpkg -x *.deb /tmp/ob`, then
--blas /tmp/ob/usr/lib/x86_64-linux-gnu/openblas-openmp): a fair torch without installing
anything. The header line names the BLAS library the child actually loaded.

--ours FILE: the stdout of `mixshow bench --nets`; then a ratio line follows each torch line:
  ratio mixshow/torch unet sd15 B=2 64x64 threads=1: 0.42 (cpu time 0.41)
The process CPU time (time.process_time, all threads) is printed beside the wall time: on a
shared machine it is disturbed less by other work than the wall time.
"""
import argparse, json, os, re, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
CONFIGS = "/work/shared/models/sd15-configs"
LABELS = {"unet": ["unet sd15 B=2 64x64"], "vae": ["vae-decode sd15 512x512"],
          "text": ["text-encoder sd15 [16,77] forward", "text-encoder sd15 [16,77] forward+backward"],
          "train": ["train sd15 B=1 64x64"]}
UNITS = {"unet": "s/step", "vae": "s", "text": "s", "train": "s/step"}


def load_avg1():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return -1.0


def blas_loaded():
    try:
        libs = {l.split()[-1] for l in open("/proc/self/maps") if "blas" in l.lower()}
        return ", ".join(sorted(os.path.realpath(x) for x in libs)) or "none"
    except OSError:
        return "?"


def init_weights(model, seed):
    """U(-a, a), a = sqrt(3 / fan_in) for rank >= 2; 1-D '.weight' = 1, 1-D bias = 0."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                a = (3.0 / (p.numel() // p.shape[0])) ** 0.5
                p.copy_(torch.rand(p.shape, generator=g) * (2 * a) - a)
            else:
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            p.requires_grad_(False)
    return model.eval()


def construct(cls, cfg_path):
    import inspect
    cfg = json.load(open(cfg_path))
    names = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in cfg.items() if k in names})


def median_time(fn, runs, label, threads):
    ts, cpu = [], []
    for i in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print("  torch %s threads=%d run %d/%d: %.3f s (cpu %.3f s)" % (label, threads, i + 1, runs, ts[-1], cpu[-1]),
              file=sys.stderr, flush=True)
    return statistics.median(ts), min(ts), max(ts), statistics.median(cpu)


def child(a):
    """One network at one thread count; prints JSON lines {label, med, lo, hi, load, rss, finite}."""
    import resource
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results = []

    def emit(label, fn, out_fn):
        load = load_avg1()
        med, lo, hi, cpu = median_time(fn, a.runs, label, a.threads)
        y = out_fn()
        results.append(dict(label=label, med=med, lo=lo, hi=hi, cpu=cpu, load=load, finite=bool(torch.isfinite(y).all()),
                            mean_abs=float(y.abs().mean())))

    if a.net == "train":
        return child_train(a)
    if a.net in ("unet", "vae"):
        from gen_vae_golden import import_diffusers
        import importlib
        AutoencoderKL, _ = import_diffusers(a.diffusers)
    if a.net == "unet":
        UNet = importlib.import_module("diffusers.models.unet_2d_condition").UNet2DConditionModel
        unet = init_weights(construct(UNet, os.path.join(CONFIGS, "unet", "config.json")), 15)
        x, ctx = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
        t = torch.tensor([999.0, 999.0])
        box = {}

        def step():
            with torch.no_grad():
                box["y"] = unet(x, t, encoder_hidden_states=ctx).sample
        emit(LABELS["unet"][0], step, lambda: box["y"])
    elif a.net == "vae":
        vae = init_weights(construct(AutoencoderKL, os.path.join(CONFIGS, "vae", "config.json")), 16)
        lat = torch.randn(1, 4, 64, 64)
        box = {}

        def decode():      # mixshow's vae_decode(latents) = decode(latents / scaling_factor)
            with torch.no_grad():
                box["y"] = vae.decode(lat / vae.config.scaling_factor).sample
        emit(LABELS["vae"][0], decode, lambda: box["y"])
    else:
        from gen_clip_golden import import_transformers
        _, mc, cc = import_transformers(a.transformers)
        cfg = cc.CLIPTextConfig(**{k: v for k, v in json.load(open(os.path.join(CONFIGS, "text_encoder", "config.json"))).items()
                                   if not k.startswith("_") and k not in ("architectures", "torch_dtype", "transformers_version")})
        model = init_weights(mc.CLIPTextModel(cfg), 17)
        B, T, D, rank = 16, 77, cfg.hidden_size, 4
        ids = torch.full((B, T), 49407, dtype=torch.long)
        ids[:, 0] = 49406
        ids[:, 1:12] = torch.randint(0, 49406, (B, 11))
        box = {}

        def fwd():
            with torch.no_grad():
                box["y"] = model(input_ids=ids).last_hidden_state
        emit(LABELS["text"][0], fwd, lambda: box["y"])
        # forward + backward as in ED-LoRA training: LoRA on q/k/v/out_proj, frozen base
        lora, hooks = [], []
        for layer in model.text_model.encoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj):
                down = (torch.randn(rank, D) * 0.02).requires_grad_()
                up = (torch.randn(D, rank) * 0.02).requires_grad_()
                lora += [down, up]
                hooks.append(lin.register_forward_hook(
                    lambda m, inp, out, d=down, u=up: out + (inp[0] @ d.t()) @ u.t()))
        hooks.append(model.text_model.embeddings.register_forward_hook(lambda m, inp, out: out.requires_grad_()))
        dout = torch.randn(B, T, D)

        def fwd_bwd():
            for p in lora:
                p.grad = None
            y = model(input_ids=ids).last_hidden_state
            y.backward(dout)
            box["y"] = y.detach()
        emit(LABELS["text"][1], fwd_bwd, lambda: box["y"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux
    for r in results:
        r["rss"] = rss
        print("RESULT " + json.dumps(r), flush=True)
    print("BLAS " + blas_loaded(), flush=True)


def child_train(a):
    """One optimizer step of the OFFICIAL trainer (EDLoRATrainer, imported unchanged through
    gen_train_golden.install_shims) and train_edlora.py's loop body, on random SD 1.5 weights.
    The 8101 potter config's models:/train: options, except enable_xformers (CPU: no xformers;
    the processors then take their plain baddbmm/softmax/bmm path, as mixshow's reference)."""
    import resource
    import torch
    import gen_train_golden as gtg
    torch.set_num_threads(a.threads)
    te, CLIPTextModel = gtg.install_shims(a.mos, a.diffusers)
    import diffusers
    import diffusers.optimization as dopt
    B, label = a.train_batch, "train sd15 B=%d 64x64" % a.train_batch

    def random_from(cls, sub, seed):           # from_pretrained(path, subfolder=sub) -> random SD 1.5
        def f(klass, path, subfolder="", **kw):
            assert subfolder == sub, subfolder
            if cls is CLIPTextModel:
                cfg = json.load(open(os.path.join(CONFIGS, "text_encoder", "config.json")))
                m = klass(cfg)
            else:
                m = construct(klass, os.path.join(CONFIGS, sub, "config.json"))
            return init_weights(m, seed)
        setattr(cls, "from_pretrained", classmethod(f))
    random_from(diffusers.UNet2DConditionModel, "unet", 15)
    random_from(diffusers.AutoencoderKL, "vae", 16)
    random_from(CLIPTextModel, "text_encoder", 17)
    models = dict(pretrained_path=os.path.join(HERE, "..", "..", "models", "tiny-sd"),   # tokenizer, scheduler
                  enable_edlora=True,
                  finetune_cfg=dict(text_embedding=dict(enable_tuning=True, lr=1e-3),
                                    text_encoder=dict(enable_tuning=True, lora_cfg=dict(rank=4, alpha=1.0, where="CLIPAttention"), lr=1e-5),
                                    unet=dict(enable_tuning=True, lora_cfg=dict(rank=4, alpha=1.0, where="Attention"), lr=1e-4)),
                  new_concept_token="<potter1>+<potter2>", initializer_token="<rand-0.013>+man",
                  noise_offset=0.01, attn_reg_weight=0.01, reg_full_identity=False, use_mask_loss=True,
                  enable_xformers=False, gradient_checkpoint=False)
    torch.manual_seed(0)
    trainer = te.EDLoRATrainer(**models)
    optimizer = torch.optim.AdamW(trainer.get_params_to_optimize(), lr=0.0, weight_decay=0.01, betas=(0.9, 0.999))
    total_iter = 3500
    lr_scheduler = dopt.get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total_iter)
    import copy
    original_embedding = copy.deepcopy(trainer.text_encoder.get_input_embeddings().weight)
    n_train = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    images = torch.rand(B, 3, 512, 512) * 2 - 1
    masks = torch.zeros(B, 1, 64, 64)
    masks[:, :, 8:56, 16:48] = 1.0
    img_masks = torch.ones(B, 1, 64, 64)
    prompts = ["a photo of a <potter1> <potter2>"] * B
    parts = []

    def step():                                 # train_edlora.py's loop body (accelerate: 1 process)
        t0 = time.perf_counter()
        trainer.unet.train()
        trainer.text_encoder.train()
        loss = trainer(images, prompts, masks, img_masks)
        index_no_updates = torch.arange(len(trainer.tokenizer)) != -1
        for token_id in trainer.get_all_concept_token_ids():
            index_no_updates[token_id] = False
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        token_embeds = trainer.text_encoder.get_input_embeddings().weight
        token_embeds.data[index_no_updates, :] = original_embedding.data[index_no_updates, :]
        float(token_embeds[trainer.get_all_concept_token_ids()].norm(dim=-1).mean())
        t3 = time.perf_counter()
        parts.append((t1 - t0, t2 - t1, t3 - t2))
        print("    loss %.6g" % float(loss), file=sys.stderr, flush=True)
        return loss
    step()                                      # warm-up
    parts.clear()
    load = load_avg1()
    med, lo, hi, cpu = median_time(step, a.runs, label, a.threads)
    finite = all(bool(torch.isfinite(p).all()) for g in optimizer.param_groups for p in g["params"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    pm = [statistics.median(x[k] for x in parts) for k in range(3)]
    print("RESULT " + json.dumps(dict(label=label, med=med, lo=lo, hi=hi, cpu=cpu, load=load, finite=finite, rss=rss,
                                      parts="forward (VAE encode, text encoder, UNet, losses) %.3f s, backward %.3f s, "
                                            "AdamW (%d floats) + lr + embedding restore %.3f s" % (pm[0], pm[1], n_train, pm[2]))),
          flush=True)
    print("BLAS " + blas_loaded(), flush=True)


def parse_ours(path):
    """(label, threads) -> (wall, cpu) from mixshow bench lines"""
    ours = {}
    for line in open(path):
        m = re.match(r"^(.+?) threads=(\d+): ([0-9.]+) (s/step|s) .*cpu ([0-9.]+) s", line.strip())
        if m:
            ours[(m.group(1), int(m.group(2)))] = (float(m.group(3)), float(m.group(5)))
    return ours


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default="text,vae,unet")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ours", help="stdout of `mixshow bench --nets`, for ratio lines")
    ap.add_argument("--blas", help="directory put first on the children's LD_LIBRARY_PATH (libblas.so.3)")
    ap.add_argument("--diffusers", default="/tmp/diffusers-0.19.3/src")
    ap.add_argument("--transformers", default="/tmp/clip_hf/src")
    ap.add_argument("--mos", default="/tmp/mos", help="Mix-of-Show 51270fd unpacked (train: its EDLoRATrainer)")
    ap.add_argument("--train-batch", type=int, default=1, help="batch of the train case (the official configs: 2)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--net", help=argparse.SUPPRESS)
    ap.add_argument("--child-threads", dest="threads_child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.threads = a.threads_child
        return child(a)

    import torch
    ours = parse_ours(a.ours) if a.ours else {}
    threads = [int(x) for x in a.threads.split(",")]
    nets = a.nets.split(",")
    env = dict(os.environ)
    if a.blas:
        env["LD_LIBRARY_PATH"] = a.blas + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    print("torch bench: torch %s, networks, SD 1.5 shapes, random weights, threads %s, median of %d runs"
          % (torch.__version__, a.threads, a.runs), flush=True)
    blas_said = False
    for net in nets:
        if net not in LABELS:
            sys.exit("bench_torch.py: unknown network %r (unet, vae, text, train)" % net)
        if net == "train":
            LABELS["train"] = ["train sd15 B=%d 64x64" % a.train_batch]
        rows = {}
        for n in threads:
            e = dict(env, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--net", net, "--child-threads", str(n),
                   "--runs", str(a.runs), "--diffusers", a.diffusers, "--transformers", a.transformers,
                   "--mos", a.mos, "--train-batch", str(a.train_batch)]
            if net == "train":      # OpenBLAS tuned for the CPU it finds, not for a forced core type
                e.pop("OPENBLAS_CORETYPE", None)
                e.pop("OPENBLAS_L2_SIZE", None)
            p = subprocess.run(cmd, env=e, stdout=subprocess.PIPE, universal_newlines=True)
            if p.returncode:
                sys.exit("bench_torch.py: %s threads=%d failed (exit %d)" % (net, n, p.returncode))
            for line in p.stdout.splitlines():
                if line.startswith("BLAS ") and not blas_said:
                    print("torch bench: BLAS loaded: " + line[5:], flush=True)
                    blas_said = True
                elif line.startswith("RESULT "):
                    r = json.loads(line[7:])
                    rows[(r["label"], n)] = r
                    print("torch %s threads=%d: %.3f %s  (%d runs %.3f..%.3f, cpu %.3f s, load %.2f)"
                          % (r["label"], n, r["med"], UNITS[net], a.runs, r["lo"], r["hi"], r["cpu"], r["load"]), flush=True)
                    if r.get("parts"):
                        print("torch %s threads=%d parts: %s" % (r["label"], n, r["parts"]), flush=True)
                    if not r["finite"]:
                        print("torch %s threads=%d: WARNING non-finite output" % (r["label"], n), flush=True)
                    if (r["label"], n) in ours:
                        w, c = ours[(r["label"], n)]
                        print("ratio mixshow/torch %s threads=%d: %.2f (cpu time %.2f)" % (r["label"], n, w / r["med"], c / r["cpu"]),
                              flush=True)
        for label in LABELS[net]:
            rss = [rows[(label, n)]["rss"] for n in threads if (label, n) in rows]
            if rss:
                print("torch %s memory: peak RSS %.1f MiB (process, weights included)" % (label, max(rss)), flush=True)


if __name__ == "__main__":
    main()
