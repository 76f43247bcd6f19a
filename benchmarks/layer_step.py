"""Time one training step (forward + backward) of a mixer layer at training shapes.

    python benchmarks/layer_step.py --mixer lla --T 16 64 --precision auto fp32 mixed

B = 32, d_model = 64, 4 heads (D = 16) by default: the quick experiments' shapes.  Prints the median
of ``--reps`` steps after 3 warm-up steps, per (T, precision).  ``--precision`` applies to the ``lla``
mixer only (passed to the op through the layer's ``op_kwargs``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lla.experiments.mixers import build_mixer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixer", default="lla")
    ap.add_argument("--T", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--precision", nargs="+", default=["auto"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    for T in a.T:
        for prec in a.precision:
            torch.manual_seed(0)
            layer = build_mixer(a.mixer, a.d_model, a.heads)
            if a.mixer == "lla":
                kw = layer.op_kwargs
                layer.op_kwargs = lambda kw=kw, prec=prec: {**kw(), "precision": prec}
            x = torch.randn(a.batch, T, a.d_model, requires_grad=True)
            times = []
            for i in range(3 + a.reps):
                t0 = time.perf_counter()
                layer(x).sum().backward()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            print(f"{a.mixer} B={a.batch} T={T} d_model={a.d_model} heads={a.heads} precision={prec} "
                  f"threads={torch.get_num_threads()}: {1e3 * statistics.median(times):.1f} ms per fwd+bwd", flush=True)


if __name__ == "__main__":
    main()
