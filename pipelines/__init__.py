"""DVC stage scripts and the one module that knows the study's params layout (``study.py``).

The library (``sdn``) never reads ``params.yaml`` and knows nothing of DVC; everything that does
lives here.
"""
