"""GPU benchmark: LLA Triton kernels vs SDPA (flash backend) and vs the PyTorch LLA path.

    python benchmarks/bench_gpu.py                      # T 1K..32K, H=16, D 64/128, bf16+fp32, fwd and fwd+bwd
    python benchmarks/bench_gpu.py --T 1024 4096 --D 64 --dtypes bf16 --modes fwd
    python benchmarks/bench_gpu.py --dry                # CPU: builds the grid, runs a tiny case interpreted
    python benchmarks/bench_gpu.py --compile-check      # CPU: compiles the kernels for sm_90, reports spills

Per row: milliseconds (CUDA events, median of --repeats after one warm-up), TFLOP/s from the
formula below, the time ratio to SDPA measured in the same run, peak memory allocated during the
call (beyond the inputs), and the relative RMS error of the output against an fp32 reference (the
PyTorch backend with the direct Cholesky solver, on the first --ref-heads heads).

FLOP accounting (causal, B*H heads, P = visible (query, key) pairs per head ~ T*S/2, D = Dv):
    SDPA  forward   4 D P                  backward 10 D P   (2 matmuls fwd, 5 bwd)
    LLA   forward   (12 + 6 n) D P         moments pass (logits, s K, s K^2) 6 D P,
                                            n CG iterations of (logits, K p, s K p K) 6 D P each,
                                            output pass (logits, K x, w V) 6 D P
          backward  (34 + 6 n) D P         query side: 8 D P + adjoint CG (n assumed = forward's)
                                            + 10 D P; key side: 16 D P
n is the reported forward CG iteration count of the slowest row, so LLA's TFLOP/s is an upper
estimate of useful work for rows that exit early.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the triton import (inside lla's backend)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import lla  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--D", type=int, nargs="+", default=[64, 128])
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-max-t", type=int, default=8192, help="skip the PyTorch LLA path above this T")
    p.add_argument("--ref-heads", type=int, default=2, help="heads checked against the fp32 reference")
    p.add_argument("--dry", action="store_true", help="CPU: build the grid, run one tiny case interpreted")
    p.add_argument("--compile-check", action="store_true",
                   help="compile the three kernels for --arch at each --D / --dtypes (no GPU needed) and "
                        "print registers and spill stack per thread")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-check")
    return p.parse_args(argv)


def grid(args):
    """The benchmark configurations: (T, D, dtype name, mode)."""
    return [(T, D, dt, mode) for D in args.D for dt in args.dtypes for T in args.T for mode in args.modes]


def flops(impl: str, mode: str, B: int, H: int, T: int, D: int, iters: int) -> float:
    pairs = B * H * T * (T + 1) / 2  # causal, S == T
    if impl == "sdpa":
        per = 4 + (10 if mode == "fwdbwd" else 0)
    else:
        per = 12 + 6 * iters + ((34 + 6 * iters) if mode == "fwdbwd" else 0)
    return per * D * pairs


class _Timer:
    """CUDA events on a GPU, perf_counter on CPU (dry run)."""

    def __init__(self, cuda: bool, warmup: bool = True):
        self.cuda, self.warmup = cuda, warmup

    def __call__(self, fn, repeats: int):
        if self.warmup:
            fn()  # warm-up (and compile)
        times = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


def _peak_mib(fn, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sdpa(q, k, v, cuda: bool):
    """Causal SDPA in [B, T, H, D] layout; the flash backend for half inputs on CUDA."""
    F = torch.nn.functional
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


def run_one(T, D, dtname, mode, args, timer, cuda, device):
    dtype = DTYPES[dtname]
    B, H = args.B, args.H
    g = torch.Generator(device="cpu").manual_seed(T + D)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    grad = mode == "fwdbwd"
    for t in (q, k, v):
        t.requires_grad_(grad)
    do = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype)

    def call(fn):
        def go():
            for t in (q, k, v):
                t.grad = None
            o = fn()
            if grad:
                o.backward(do)
            return o

        return go

    lla_kw = dict(ridge=args.ridge, causal=True, solver="cg")
    impls = {
        "sdpa": lambda: _sdpa(q, k, v, cuda),
        "lla-triton": lambda: lla.local_linear_attention(q, k, v, backend="triton", **lla_kw),
    }
    if T <= args.torch_max_t:
        impls["lla-torch"] = lambda: lla.local_linear_attention(q, k, v, backend="torch", **lla_kw)

    # the reference: fp32 inputs, direct (Cholesky) solver, first heads only
    nh = min(args.ref_heads, H)
    with torch.no_grad():
        qr, kr, vr = (t.detach()[:, :, :nh].float() for t in (q, k, v))
        ref = lla.local_linear_attention(qr, kr, vr, ridge=args.ridge, solver="direct", backend="torch")
        _, aux = lla.local_linear_attention(
            q.detach(), k.detach(), v.detach(), backend="triton", return_aux=True, **lla_kw
        )
    iters = aux.iters

    rows, ms_sdpa = [], None
    for name, fn in impls.items():
        ms = timer(call(fn), args.repeats)
        peak = _peak_mib(call(fn), cuda)
        with torch.no_grad():
            o = fn()
        err = ((o[:, :, :nh].float() - ref).norm() / ref.norm()).item()
        fl = flops("sdpa" if name == "sdpa" else "lla", mode, B, H, T, D, iters)
        if name == "sdpa":
            ms_sdpa = ms
        rows.append((name, ms, fl / (ms * 1e-3) / 1e12, ms / ms_sdpa, peak, err))
        del o
    for name, ms, tflops, ratio, peak, err in rows:
        print(
            f"{T:>6} {D:>4} {dtname:>5} {mode:>7} {name:>11} {ms:>10.3f} {tflops:>8.2f} {ratio:>9.2f}x "
            f"{peak:>10.1f} {err:>9.2e} {iters if name != 'sdpa' else '':>5}",
            flush=True,
        )


def compile_check(args) -> int:
    """Ahead-of-time compile (Triton -> cubin) of the kernels with the tiles ``block_config`` picks
    (``benchmarks/compile_check.py lla``)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compile_check as cc

    return cc.main(["lla", "--arch", str(args.arch), "--D", *map(str, args.D), "--dtypes", *args.dtypes])


def main(argv=None) -> int:
    args = parse(argv)
    if args.compile_check:
        return compile_check(args)
    cuda = torch.cuda.is_available()
    if args.dry:
        configs = grid(args)
        print(f"grid: {len(configs)} configurations, e.g. {configs[:3]} ... {configs[-1]}")
        args.T, args.D, args.H, args.dtypes, args.modes = [32], [16], 2, ["fp32"], ["fwdbwd"]
        args.repeats, args.ref_heads = 1, 2
        cuda, device = False, "cpu"
    else:
        if not cuda:
            print(
                "bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                "Run `python benchmarks/bench_gpu.py --dry` to check the script on CPU.",
                file=sys.stderr,
            )
            return 2
        device = "cuda"
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(
        f"{'T':>6} {'D':>4} {'dtype':>5} {'mode':>7} {'impl':>11} {'ms':>10} {'TFLOP/s':>8} {'vs sdpa':>10} "
        f"{'peak MiB':>10} {'rel err':>9} {'iters':>5}"
    )
    timer = _Timer(cuda, warmup=not args.dry)
    for T, D, dtname, mode in grid(args):
        try:
            run_one(T, D, dtname, mode, args, timer, cuda, device)
        except torch.OutOfMemoryError:
            print(f"{T:>6} {D:>4} {dtname:>5} {mode:>7}  out of memory", flush=True)
            torch.cuda.empty_cache()
    if args.dry:
        print("dry run ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
