"""A randomly initialised FID-Inception weights file, built offline for the tests that need one."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception


def save_random_fid_inception(directory: Path) -> Path:
    """torch-fidelity's own FID-Inception with He-initialised convs, saved as a state dict."""
    directory.mkdir(parents=True, exist_ok=True)
    empty = directory / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    # torch-fidelity's constructor insists on loading weights: give it an empty dict and skip the load.
    with mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, **kw: None):
        net = tf_inception.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
        )
    for module in net.modules():  # He init keeps activations O(1) through the 40-odd layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = directory / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path
