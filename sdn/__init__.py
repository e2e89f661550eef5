"""Spatial Dependency Networks: layers, VAE models, likelihoods, metrics, data, training, tracking.

The library never reads ``params.yaml`` and knows nothing of DVC; the stage scripts in
``pipelines/`` translate the study's params into calls of this package.
"""

__version__ = "0.1.0"
