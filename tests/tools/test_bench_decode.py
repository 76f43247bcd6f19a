"""``benchmarks/bench_decode.py --table``: saved runs combined per cell (median ratio to SDPA, its range,
the target verdict on the median)."""

from __future__ import annotations

import importlib.util
import json
import os

from conftest import ROOT


def _bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode", os.path.join(ROOT, "benchmarks", "bench_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # (its main() runs only as a script)
    return mod


def _run(path, started, sdpa, lla, parallax):
    res = {"after/sdpa": dict(ms=sdpa), "after/lla": dict(ms=lla), "after/parallax": dict(ms=parallax),
           "after/gram": dict(error="NotImplementedError: n/a")}
    run = dict(started=started, srcs=[["after", "src"]],
               results=[dict(threads=1, case="S=32K", cfg={}, load_before=[0, 0, 0], res=res)])
    with open(path, "w") as f:
        json.dump(run, f)
    return str(path)


def test_table_combines_runs(tmp_path):
    bd = _bench_decode()
    paths = [_run(tmp_path / "a.json", "t1", 10.0, 50.0, 14.0),  # 5.0x, 1.4x
             _run(tmp_path / "b.json", "t2", 10.0, 20.0, 16.0),  # 2.0x, 1.6x
             _run(tmp_path / "c.json", "t3", 20.0, 50.0, 28.0)]  # 2.5x, 1.4x
    text = bd.combined_table(paths)
    row = next(line for line in text.splitlines() if line.startswith("| S=32K"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # case | SDPA ms (median) | LLA median [range] | ok (<= 3x) | moment GEMMs | Parallax median [range] | ok (<= 1.5x)
    assert cells == ["S=32K", "10", "2.50x [2.00-5.00]", "yes", "n/a", "1.40x [1.40-1.60]", "yes"]
    assert text.startswith("3 runs (t1, t2, t3), src 'after'")
