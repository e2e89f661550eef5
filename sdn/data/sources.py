"""Default public sources of the archived datasets (URL, file name, checksum).

These are defaults only: the pipeline passes the URL and checksum from ``params.yaml`` so a user can
point at a mirror. A ``None`` checksum means "not verified": the download prints the computed
sha256 and warns, so the user can pin it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchiveSource:
    """Where an archived dataset comes from and how to recognise a good copy of it."""

    name: str
    url: str
    filename: str
    kind: str  # "tar.gz", "tar", "h5" or "npz": the container the download step sanity-checks
    md5: str | None = None
    sha256: str | None = None
    note: str = ""


SOURCES: dict[str, ArchiveSource] = {
    "cifar10": ArchiveSource(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        kind="tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        note="md5 as pinned by torchvision's CIFAR10",
    ),
    "imagenet32": ArchiveSource(
        name="imagenet32",
        url="https://storage.googleapis.com/glow-demo/data/imagenet-oord-tfr.tar",
        filename="imagenet-oord-tfr.tar",
        kind="tar",
        note="Glow's tfrecords of van den Oord's ImageNet 32x32; checksum not published",
    ),
    "celebahq256": ArchiveSource(
        name="celebahq256",
        url="https://storage.googleapis.com/glow-demo/data/celeba-tfr.tar",
        filename="celeba-tfr.tar",
        kind="tar",
        note="Glow's tfrecords of CelebA-HQ (all resolutions); checksum not published",
    ),
    "shapes3d": ArchiveSource(
        name="shapes3d",
        url="https://storage.googleapis.com/3d-shapes/3dshapes.h5",
        filename="3dshapes.h5",
        kind="h5",
        md5="099a2078d58cec4daad0702c55d06868",
        note="md5 quoted identically by several public loaders (e.g. disent); 267,573,662 bytes",
    ),
    "dsprites": ArchiveSource(
        name="dsprites",
        url=(
            "https://github.com/deepmind/dsprites-dataset/raw/master/"
            "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
        ),
        filename="dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
        kind="npz",
    ),
}
