"""``benchmarks/gpu_check.py`` (the first device run) finds what it runs: the case scripts it starts exist
and hold the cases the interpreter tests list, and each script gets its own log (no GPU needed)."""

from __future__ import annotations

import importlib.util
import os

from conftest import ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # (its main() runs only as a script)
    return mod


def test_case_scripts_exist_and_list_the_tested_cases():
    import sys

    gc = _gpu_check()
    for script, folder, module in zip(gc.CASE_SCRIPTS, ("lla", "parallax"), ("test_triton", "test_parallax_triton")):
        assert os.path.isfile(os.path.join(ROOT, "tests", script)), script
        sys.path.insert(0, os.path.join(ROOT, "tests", folder))
        try:
            cases = importlib.import_module(module).CASES
        finally:
            sys.path.pop(0)
        assert set(gc._case_names(script)) == set(cases) and cases, script
    # one log per script and worker: the names differ by the script's folder
    assert len({script.split("/")[0] for script in gc.CASE_SCRIPTS}) == len(gc.CASE_SCRIPTS)
