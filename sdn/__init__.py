"""Spatial Dependency Networks: layers, VAE models, likelihoods, metrics, data and training.

A library that knows no study: it never reads ``params.yaml``, DVC or MLflow state, and knows
nothing of ``baselines`` or ``pipelines`` (it imports neither). Callers hand it explicit configs:
model architecture configs with their presets live in each model module
(``sdn.models.hvae``, ``sdn.models.vanilla_vae``), optimisation settings in
``sdn.training.TrainConfig``; decoder-block variants register themselves by name
(``sdn.models.blocks.register_blocks``). The stage scripts in ``pipelines/`` translate the
study's params into calls of this package.
"""

__version__ = "0.1.0"
