#!/usr/bin/python3
"""OpenBLAS sgemm on the GEMM shapes of `mixshow bench`, printed in its format, beside ours.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /usr/bin/python3 tools/ref/bench_openblas.py \\
        [--mixshow ./mixshow] [--runs 7] [--threads 1] [--blas DIR] [--coretypes auto,SkylakeX]

Cases: C = A B^T, A (M,K), B (N,K), float32 -- the layout of linear_forward and of the lines
  gemm M=4096 K=320 N=320 threads=1: 183.2 GFLOP/s = 84.1% of peak
of `mixshow bench` (M,K,N = 4096,320,320  4096,320,1280  1024,640,640  77,768,768  4096,1280,320).
Each shape is timed twice: np.matmul(A, B.T, out=C) (numpy hands the transposed view to
cblas_sgemm with TransB) and cblas_sgemm called directly through ctypes (no numpy overhead).
The figure is the median of --runs calls after one warm-up, as mixshow's; the process CPU time
(time.process_time) is measured too and printed as a second figure: on a shared machine it is
disturbed less by other work than the wall time.

BLAS: Debian's numpy links libblas.so.3, on this machine netlib's reference BLAS. The timings
run in a child process with LD_LIBRARY_PATH=--blas DIR first (default: an unpacked Debian
libopenblas0-openmp, `apt-get download libopenblas0-openmp; dpkg -x *.deb /tmp/ob`), so numpy
loads OpenBLAS's libblas.so.3; the header names the library numpy actually mapped
(/proc/self/maps), OpenBLAS's version/config string and the core its dynamic-arch dispatch
chose (openblas_get_corename). The child runs WITHOUT OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE
(OpenBLAS autodetects its kernel), OPENBLAS_NUM_THREADS = OMP_NUM_THREADS = --threads.
--coretypes (default auto,SkylakeX,Cooperlake) adds runs with OPENBLAS_CORETYPE forced to each
named core, to see whether autodetection picked OpenBLAS's best kernel on this CPU (`auto` is the
autodetected one). OpenBLAS 0.3.21 (Debian bookworm) does not know CPUID family 6 model 207
(Emerald Rapids) and falls back to its generic Prescott (SSE3) kernels; its AVX-512 kernels
are SkylakeX and Cooperlake (which SapphireRapids maps to in 0.3.21).

--mixshow PATH then runs `PATH bench --gemm --runs R` with OMP_NUM_THREADS = --threads (its
peak, GEMM and conv lines are printed unchanged) and a ratio line per shape:
  ratio mixshow/openblas gemm M=4096 K=320 N=320 threads=1: 1.08 (openblas auto SkylakeX 171.0
  GFLOP/s = 80.2% of mixshow's avx512 peak in this run)
using the best OpenBLAS figure (cblas or numpy) of the autodetected core, then of the best core
listed (`best Cooperlake ...: ratio`).
"""
import argparse, ctypes, os, re, statistics, subprocess, sys, time

SHAPES = [(4096, 320, 320), (4096, 320, 1280), (1024, 640, 640), (77, 768, 768), (4096, 1280, 320)]
DEFAULT_BLAS = "/tmp/ob/usr/lib/x86_64-linux-gnu/openblas-openmp"


def load_avg1():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return -1.0


def mapped_blas():
    """Paths of the BLAS libraries mapped into this process."""
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()[-1]
            if re.search(r"lib(open)?blas", os.path.basename(p)):
                libs.add(p)
    return sorted(libs)


def child(args):
    import numpy as np
    rng = np.random.default_rng(1)
    a = np.ones((2, 2), np.float32)
    a @ a.T                                       # maps the BLAS
    libs = mapped_blas()
    ob = None
    for p in libs:                                # the library that exports OpenBLAS's API
        try:
            lib = ctypes.CDLL(p)
            lib.openblas_get_corename
            ob = lib
            break
        except (OSError, AttributeError):
            continue
    core = config = "?"
    if ob is not None:
        ob.openblas_get_corename.restype = ctypes.c_char_p
        ob.openblas_get_config.restype = ctypes.c_char_p
        core = ob.openblas_get_corename().decode()
        config = ob.openblas_get_config().decode()
        if hasattr(ob, "openblas_get_num_threads"):
            config += ", %d thread(s)" % ob.openblas_get_num_threads()
    label = os.environ.get("OPENBLAS_CORETYPE", "auto")
    print("blas %s: %s | core %s | %s" % (label, " ".join(libs) or "none", core, config), flush=True)
    if ob is None:
        print("blas %s: no OpenBLAS in this process (numpy's libblas.so.3 is another BLAS): "
              "pass --blas DIR" % label, flush=True)
        return 1
    sg = ob.cblas_sgemm
    sg.restype = None
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    sg.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
    ROW, NOTRANS, TRANS = 101, 111, 112
    for M, K, N in SHAPES:
        A = rng.standard_normal((M, K), dtype=np.float32)
        B = rng.standard_normal((N, K), dtype=np.float32)
        C = np.empty((M, N), np.float32)
        C2 = np.empty((M, N), np.float32)
        flops = 2.0 * M * N * K
        ap, bp, cp = A.ctypes.data, B.ctypes.data, C2.ctypes.data
        fns = {"numpy": lambda: np.matmul(A, B.T, out=C),
               "cblas": lambda: sg(ROW, NOTRANS, TRANS, M, N, K, 1.0, ap, K, bp, K, 0.0, cp, N)}
        res = {}
        for name, fn in fns.items():
            fn()                                  # warm-up
            wall, cpu = [], []
            for _ in range(args.runs):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            res[name] = (flops / statistics.median(wall) * 1e-9, flops / statistics.median(cpu) * 1e-9)
        err = float(np.max(np.abs(C - C2)) / (np.max(np.abs(C)) + 1e-30))
        print("openblas %s gemm M=%d K=%d N=%d threads=%d: %.1f GFLOP/s cblas (cpu %.1f), %.1f numpy (cpu %.1f)"
              "  [core %s, numpy vs cblas max rel diff %.1e]"
              % (label, M, K, N, args.threads, res["cblas"][0], res["cblas"][1], res["numpy"][0], res["numpy"][1],
                 core, err), flush=True)
    return 0


def run_child(args, coretype):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    if coretype != "auto":
        env["OPENBLAS_CORETYPE"] = coretype
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    if args.blas:
        env["LD_LIBRARY_PATH"] = args.blas + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--runs", str(args.runs), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, universal_newlines=True).stdout
    sys.stdout.write(out)
    sys.stdout.flush()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blas", default=DEFAULT_BLAS if os.path.isdir(DEFAULT_BLAS) else "",
                    help="folder with OpenBLAS's libblas.so.3, put first on LD_LIBRARY_PATH")
    ap.add_argument("--coretypes", default="auto,SkylakeX,Cooperlake",
                    help="auto and/or OpenBLAS core names, comma-separated")
    ap.add_argument("--mixshow", default="", help="path of the mixshow binary: run its bench --gemm after")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if v in os.environ:
            print("note: %s=%s is set here; the OpenBLAS runs remove it (autodetect)" % (v, os.environ[v]))
    print("bench_openblas: load %.2f, OpenBLAS from %s" % (load_avg1(), args.blas or "the default library path"))
    auto, best = {}, {}                           # (M,K,N) -> (GFLOP/s, core): autodetected, best listed
    for ct in args.coretypes.split(","):
        out = run_child(args, ct.strip())
        core = re.search(r"\| core (\S+)", out)
        for m in re.finditer(r"gemm M=(\d+) K=(\d+) N=(\d+) threads=\d+: ([\d.]+) GFLOP/s cblas \(cpu [\d.]+\), ([\d.]+) numpy", out):
            key = tuple(int(m.group(i)) for i in (1, 2, 3))
            v = (max(float(m.group(4)), float(m.group(5))), core.group(1) if core else "?")
            if ct.strip() == "auto":
                auto[key] = v
            if key not in best or v[0] > best[key][0]:
                best[key] = v
    if not args.mixshow:
        return 0
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads)
    print("bench_openblas: load %.2f, %s bench --gemm --runs %d (OMP_NUM_THREADS=%d)"
          % (load_avg1(), args.mixshow, args.runs, args.threads), flush=True)
    out = subprocess.run([args.mixshow, "bench", "--gemm", "--runs", str(args.runs)], env=env,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout
    sys.stdout.write(out)
    level = re.search(r"kernels (\S+)", out)
    peak = None
    if level:
        pm = re.search(r"peak %s\s+threads=%d: ([\d.]+)" % (re.escape(level.group(1)), args.threads), out)
        peak = float(pm.group(1)) if pm else None
    for m in re.finditer(r"^gemm M=(\d+) K=(\d+) N=(\d+) threads=(\d+): ([\d.]+) GFLOP/s", out, re.M):
        key = tuple(int(m.group(i)) for i in (1, 2, 3))
        if int(m.group(4)) != args.threads or key not in best:
            continue
        ours = float(m.group(5))
        def share(v):
            return " = %.1f%% of mixshow's %s peak" % (100.0 * v / peak, level.group(1)) if peak else ""
        txt = []
        if key in auto:
            txt.append("%.2f (openblas auto %s %.1f GFLOP/s%s)" % (ours / auto[key][0], auto[key][1], auto[key][0], share(auto[key][0])))
        txt.append("best %s: %.2f (%.1f GFLOP/s%s)" % (best[key][1], ours / best[key][0], best[key][0], share(best[key][0])))
        print("ratio mixshow/openblas gemm M=%d K=%d N=%d threads=%d: %s" % (key + (args.threads, "; ".join(txt))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
