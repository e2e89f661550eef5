"""DVC stage scripts and the one module that knows the study's params layout (``study.py``).

The library (``sdn``) never reads ``params.yaml`` and knows nothing of DVC; everything that does
lives here.

Importing this package pins what NumPy/SciPy's OpenBLAS does before NumPy loads it (a stage runs as
``python -m pipelines.<stage>``, so this runs first): one thread, and the Haswell (AVX2) kernels
instead of the kernel OpenBLAS picks from the CPU it detects, which can differ between machines of
one kind and changed a disentanglement metric (its classifiers run on that BLAS) in its 4th digit.
The environment may override both (``OPENBLAS_CORETYPE``, ``OPENBLAS_NUM_THREADS``); torch's own
CPU kernels are not affected.
"""

import os

BLAS_PINS = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1"}
for _name, _value in BLAS_PINS.items():
    os.environ.setdefault(_name, _value)
