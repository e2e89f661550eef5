"""The download step against a local HTTP server: checksums (also torch.hub-style sha256 prefixes, as
in the FID Inception weights' file name), resume, every failure mode, and the --fid-weights stage."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fixtures_data import closed_port, make_dsprites_npz, serve, url
from sdn.data.download import DownloadError, download

FAST = {"retries": 0, "backoff_s": 0.0, "timeout": 10.0, "progress": False}


@pytest.fixture()
def served(tmp_path):
    """A small real-format npz served from tmp_path/www; yields (server, name, bytes)."""
    www = tmp_path / "www"
    www.mkdir()
    make_dsprites_npz(www / "d.npz", sizes=(3, 1, 2, 2, 2))
    data = (www / "d.npz").read_bytes()
    with serve(www) as server:
        yield server, "d.npz", data


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _assert_nothing_final(dest):
    assert not dest.exists()


def test_download_verifies_and_second_run_fetches_nothing(served, tmp_path):
    server, name, data = served
    dest = tmp_path / "raw" / name
    result = download("dsprites", url(server, "ok", name), dest, md5=_md5(data), kind="npz", **FAST)
    assert dest.read_bytes() == data
    assert result.fetched and result.verified
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert not dest.with_name(name + ".part").exists()
    before = len(server.requests)
    again = download("dsprites", url(server, "ok", name), dest, md5=_md5(data), kind="npz", **FAST)
    assert len(server.requests) == before  # no request at all
    assert not again.fetched and again.path == dest


def test_sha256_checksum_is_accepted(served, tmp_path):
    server, name, data = served
    sha = hashlib.sha256(data).hexdigest().upper()  # case does not matter
    result = download("dsprites", url(server, "ok", name), tmp_path / name, sha256=sha, **FAST)
    assert result.verified and (tmp_path / name).read_bytes() == data


def test_wrong_checksum_raises_one_clear_error_and_leaves_nothing(served, tmp_path):
    server, name, data = served
    dest = tmp_path / name
    wrong = "0" * 32
    address = url(server, "ok", name)
    with pytest.raises(DownloadError) as info:
        download("dsprites", address, dest, md5=wrong, **FAST)
    message = str(info.value)
    assert "dsprites" in message and address in message and wrong in message
    assert _md5(data) in message  # what was actually received
    _assert_nothing_final(dest)
    assert not dest.with_name(name + ".part").exists()


def test_truncated_transfer_raises_and_keeps_only_the_part_file(served, tmp_path):
    server, name, data = served
    dest = tmp_path / name
    with pytest.raises(DownloadError, match="truncated|broke"):
        download("dsprites", url(server, "truncate", name), dest, md5=_md5(data), **FAST)
    _assert_nothing_final(dest)
    part = dest.with_name(name + ".part")
    assert part.exists() and len(part.read_bytes()) < len(data)  # kept for a later resume


def test_interrupted_transfer_resumes_with_range_on_retry(served, tmp_path):
    server, name, data = served
    dest = tmp_path / name
    kwargs = {**FAST, "retries": 1}
    result = download("dsprites", url(server, "flaky", name), dest, md5=_md5(data), **kwargs)
    assert dest.read_bytes() == data and result.fetched
    ranges = [r for _, r in server.requests]
    assert ranges[0] is None
    assert ranges[1] == f"bytes={len(data) // 2}-"  # resumed where the first transfer stopped


def test_resume_from_an_existing_partial_file(served, tmp_path):
    server, name, data = served
    dest = tmp_path / name
    dest.with_name(name + ".part").write_bytes(data[:1000])
    download("dsprites", url(server, "ok", name), dest, md5=_md5(data), **FAST)
    assert dest.read_bytes() == data
    assert server.requests[-1][1] == "bytes=1000-"


def test_server_without_range_support_restarts_from_zero(served, tmp_path):
    server, name, data = served
    dest = tmp_path / name
    dest.with_name(name + ".part").write_bytes(b"garbage that is not a prefix")
    download("dsprites", url(server, "norange", name), dest, md5=_md5(data), **FAST)
    assert dest.read_bytes() == data


def test_html_error_page_is_rejected(served, tmp_path):
    server, name, _ = served
    dest = tmp_path / name
    with pytest.raises(DownloadError, match="HTML") as info:
        download("dsprites", url(server, "html", name), dest, kind="npz", **FAST)
    assert "dsprites" in str(info.value)
    _assert_nothing_final(dest)
    assert not dest.with_name(name + ".part").exists()


def test_html_body_with_binary_content_type_is_rejected(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "page.tar").write_bytes(b"  <!DOCTYPE html><html><body>Sign in</body></html>")
    with serve(www) as server, pytest.raises(DownloadError, match="HTML"):
        download("imagenet32", url(server, "ok", "page.tar"), tmp_path / "x.tar", kind="tar", **FAST)
    assert not (tmp_path / "x.tar").exists()


def test_unreachable_host_raises_download_error(tmp_path):
    address = f"http://127.0.0.1:{closed_port()}/ok/file.npz"
    with pytest.raises(DownloadError, match="unreachable") as info:
        download("dsprites", address, tmp_path / "file.npz", **FAST)
    assert address in str(info.value)
    assert not (tmp_path / "file.npz").exists()


def test_http_404_raises_download_error(served, tmp_path):
    server, _, _ = served
    with pytest.raises(DownloadError, match="404"):
        download("dsprites", url(server, "ok", "missing.npz"), tmp_path / "m.npz", **FAST)


def test_no_checksum_warns_with_the_computed_sha256(served, tmp_path):
    server, name, data = served
    with pytest.warns(UserWarning, match=hashlib.sha256(data).hexdigest()):
        result = download("dsprites", url(server, "ok", name), tmp_path / name, kind="npz", **FAST)
    assert not result.verified and (tmp_path / name).read_bytes() == data


def test_existing_file_with_wrong_checksum_is_replaced(served, tmp_path):
    server, name, data = served
    dest = tmp_path / name
    dest.write_bytes(b"stale")
    with pytest.warns(UserWarning, match="not valid"):
        result = download("dsprites", url(server, "ok", name), dest, md5=_md5(data), **FAST)
    assert result.fetched and dest.read_bytes() == data


@pytest.mark.parametrize("bad", [{"md5": "xyz"}, {"sha256": "ab" * 10}, {"kind": "rar"}])
def test_bad_arguments_raise_value_error(tmp_path, bad):
    with pytest.raises(ValueError):
        download("cifar10", "http://127.0.0.1:1/x", tmp_path / "x", **bad, **FAST)


def test_non_url_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="url"):
        download("cifar10", "/local/path.tar.gz", tmp_path / "x", **FAST)


def _build(kind, path):
    from fixtures_data import make_cifar10_tarball, make_glow_tar, make_shapes3d_h5

    if kind == "tar.gz":
        make_cifar10_tarball(path, per_batch=2, num_test=2)
    elif kind == "tar":
        make_glow_tar(path, "imagenet-oord-tfr", 32, {"validation": 3}, {"validation": 2})
    elif kind == "h5":
        make_shapes3d_h5(path, sizes=(2, 1, 1, 1, 2, 2))
    else:
        make_dsprites_npz(path, sizes=(3, 1, 1, 2, 2))


@pytest.mark.parametrize("kind", ["tar.gz", "tar", "h5", "npz"])
def test_truncated_archive_without_checksum_is_rejected(tmp_path, kind):
    """A server that sends a cut file with a matching length: only the container check sees it."""
    www = tmp_path / "www"
    www.mkdir()
    full = tmp_path / f"full.{kind}"
    _build(kind, full)
    data = full.read_bytes()
    cut = int(len(data) * 0.6)
    if kind == "tar":  # cut inside the last member's data, not in the zero padding at the end
        import tarfile

        with tarfile.open(full) as archive:
            last = archive.getmembers()[-1]
        cut = last.offset_data + last.size // 2
    (www / f"cut.{kind}").write_bytes(data[:cut])
    (www / f"whole.{kind}").write_bytes(data)
    with serve(www) as server:
        with pytest.raises(DownloadError, match="complete|truncated"):
            download("x", url(server, "ok", f"cut.{kind}"), tmp_path / f"a.{kind}", kind=kind, **FAST)
        assert not (tmp_path / f"a.{kind}").exists()
        with pytest.warns(UserWarning, match="NOT verified"):  # the whole file passes
            download("x", url(server, "ok", f"whole.{kind}"), tmp_path / f"b.{kind}", kind=kind, **FAST)
    assert (tmp_path / f"b.{kind}").read_bytes() == data


# ---------------------------------------------------------------- sha256 prefix (torch.hub file names)
@pytest.fixture()
def hub_named(tmp_path):
    """A file served under a torch.hub-style name ``weights-<first 8 hex of its sha256>.pth``."""
    www = tmp_path / "hub"
    www.mkdir()
    data = np.random.default_rng(0).bytes(300_000)
    prefix = hashlib.sha256(data).hexdigest()[:8]
    name = f"weights-inception-2015-12-05-{prefix}.pth"
    (www / name).write_bytes(data)
    with serve(www) as server:
        yield server, name, data, prefix


def test_sha256_prefix_verifies_like_torch_hub(hub_named, tmp_path):
    """The prefix check accepts what torch.hub's own check (download_url_to_file) accepts."""
    import torch.hub

    server, name, data, prefix = hub_named
    dest = tmp_path / "raw" / name
    result = download("fid_weights", url(server, "ok", name), dest, sha256_prefix=prefix.upper(), **FAST)
    assert result.fetched and result.verified and dest.read_bytes() == data
    assert result.sha256.startswith(prefix) and result.sha256 == hashlib.sha256(data).hexdigest()
    again = download("fid_weights", url(server, "ok", name), dest, sha256_prefix=prefix, **FAST)
    assert not again.fetched and again.verified
    # torch.hub (the convention torch-fidelity's file name follows) agrees: same prefix, sha256.
    hub_copy = tmp_path / "hub_copy.pth"
    torch.hub.download_url_to_file(url(server, "ok", name), str(hub_copy), hash_prefix=prefix, progress=False)
    assert hub_copy.read_bytes() == data
    with pytest.raises(RuntimeError, match="invalid hash value"):  # an md5 prefix is not what it checks
        torch.hub.download_url_to_file(url(server, "ok", name), str(tmp_path / "md5.pth"),
                                       hash_prefix=_md5(data)[:8], progress=False)


def test_wrong_sha256_prefix_fails_clearly_and_leaves_nothing(hub_named, tmp_path):
    server, name, data, prefix = hub_named
    dest = tmp_path / name
    wrong = "0123abcd" if prefix != "0123abcd" else "fedc4321"
    address = url(server, "ok", name)
    with pytest.raises(DownloadError) as info:
        download("fid_weights", address, dest, sha256_prefix=wrong, **FAST)
    message = str(info.value)
    assert "fid_weights" in message and address in message and f"sha256 starting with {wrong}" in message
    assert hashlib.sha256(data).hexdigest() in message  # what was actually received
    assert not dest.exists() and not dest.with_name(name + ".part").exists()


def test_sha256_prefix_download_resumes_after_truncation(hub_named, tmp_path):
    server, name, data, prefix = hub_named
    dest = tmp_path / name
    with pytest.raises(DownloadError, match="truncated|broke"):
        download("fid_weights", url(server, "truncate", name), dest, sha256_prefix=prefix, **FAST)
    part = dest.with_name(name + ".part")
    assert not dest.exists() and 0 < part.stat().st_size < len(data)
    kept = part.stat().st_size
    result = download("fid_weights", url(server, "ok", name), dest, sha256_prefix=prefix, **FAST)
    assert result.verified and dest.read_bytes() == data and not part.exists()
    assert server.requests[-1][1] == f"bytes={kept}-"  # resumed, not restarted
    flaky = tmp_path / "flaky" / name
    download("fid_weights", url(server, "flaky", name), flaky, sha256_prefix=prefix, **{**FAST, "retries": 1})
    assert flaky.read_bytes() == data


@pytest.mark.parametrize("bad", ["abc", "z" * 8, "0" * 65, 12345678])
def test_bad_sha256_prefix_raises_value_error(tmp_path, bad):
    with pytest.raises(ValueError, match="sha256 prefix"):
        download("fid_weights", "http://127.0.0.1:1/x", tmp_path / "x", sha256_prefix=bad, **FAST)


def _fid_params(path, weights_url, weights_path, prefix=None, sha256=None):
    import yaml

    params = {"fid": {"weights_path": str(weights_path),
                      "weights": {"url": weights_url, "sha256_prefix": prefix, "sha256": sha256,
                                  "dvc_dep": "pipelines/fid_stats.py", "retries": 0}}}
    path.write_text(yaml.safe_dump(params))
    return path


def test_fid_weights_stage_script_downloads_and_verifies(hub_named, tmp_path, capsys):
    from pipelines.download import main

    server, name, data, prefix = hub_named
    dest = tmp_path / "data/raw/fid" / name
    params = _fid_params(tmp_path / "p.yaml", url(server, "ok", name), dest, prefix=prefix)
    assert main(["--fid-weights", "--params", str(params), "--quiet"]) == 0
    assert dest.read_bytes() == data
    out = capsys.readouterr().out
    assert "downloaded" in out and "verified" in out and hashlib.sha256(data).hexdigest() in out
    full = _fid_params(tmp_path / "full.yaml", url(server, "ok", name), tmp_path / "b" / name,
                       sha256=hashlib.sha256(data).hexdigest())  # the full pin, once recorded
    assert main(["--fid-weights", "--params", str(full), "--quiet"]) == 0


def test_fid_weights_stage_script_fails_on_a_wrong_hash(hub_named, tmp_path, capsys):
    from pipelines.download import main

    server, name, _, prefix = hub_named
    dest = tmp_path / "data/raw/fid" / name
    wrong = "0" * 64
    params = _fid_params(tmp_path / "p.yaml", url(server, "ok", name), dest, prefix=prefix, sha256=wrong)
    assert main(["--fid-weights", "--params", str(params), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "fid_weights" in err and f"sha256 {wrong}" in err and "mismatch" in err
    assert not dest.exists() and not dest.with_name(name + ".part").exists()
    empty = tmp_path / "empty.yaml"
    empty.write_text("fid: {weights_path: x.pth}\n")
    with pytest.raises(ValueError, match="fid.weights.url"):
        main(["--fid-weights", "--params", str(empty)])
