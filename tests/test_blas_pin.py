"""The stages pin NumPy/SciPy's OpenBLAS (kernel and threads) before NumPy loads it, so that the
disentanglement metrics' classifiers give the same bits on every machine of one kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline_harness import ROOT

PROBE = ("import pipelines, numpy, scipy.linalg, threadpoolctl, json; "
         "print(json.dumps([(i['internal_api'], i.get('architecture'), i['num_threads']) "
         "for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']))")


def blas_of_a_stage(**env: str) -> list[list]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_stages_run_openblas_on_one_thread_with_the_haswell_kernels():
    libraries = blas_of_a_stage()
    assert libraries and all(api == "openblas" for api, _, _ in libraries)
    assert {(arch, threads) for _, arch, threads in libraries} == {("Haswell", 1)}


def test_the_environment_may_override_the_pins():
    libraries = blas_of_a_stage(OPENBLAS_NUM_THREADS="2", OPENBLAS_CORETYPE="Sandybridge")
    assert {(arch, threads) for _, arch, threads in libraries} == {("Sandybridge", 2)}
