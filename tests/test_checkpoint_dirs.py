"""Checkpoint directories keyed by the run configuration (what lets a DVC stage resume safely)."""

from __future__ import annotations

from sdn.checkpoint import config_fingerprint, remove_other_checkpoints, run_checkpoint_dir


def test_fingerprint_ignores_key_order_and_sees_every_value():
    a = {"model": {"h": 32, "z": 4}, "train": {"lr": 0.002, "steps": 10}, "seed": 0}
    b = {"seed": 0, "train": {"steps": 10, "lr": 0.002}, "model": {"z": 4, "h": 32}}
    assert config_fingerprint(a) == config_fingerprint(b)
    changed = {**a, "train": {"lr": 0.002, "steps": 11}}
    assert config_fingerprint(changed) != config_fingerprint(a)
    assert config_fingerprint({**a, "seed": 1}) != config_fingerprint(a)


def test_changed_config_gets_a_fresh_directory_and_stale_ones_are_removed(tmp_path):
    old = run_checkpoint_dir(tmp_path, {"lr": 1.0})
    new = run_checkpoint_dir(tmp_path, {"lr": 2.0})
    assert old != new and old.parent == new.parent == tmp_path / "checkpoints"
    assert run_checkpoint_dir(tmp_path, {"lr": 1.0}) == old  # same config resumes from the same place
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "checkpoint.pt").write_bytes(b"x")
    assert remove_other_checkpoints(new) == [old]
    assert not old.exists() and (new / "checkpoint.pt").exists()


def test_source_fingerprint_ignores_comments_docstrings_and_formatting_only(tmp_path):
    from sdn.checkpoint import source_fingerprint

    package = tmp_path / "pkg"
    package.mkdir()
    module = package / "layer.py"
    original = '"""A layer."""\n\n\ndef scale(x):\n    """Twice x."""\n    return 2 * x\n\n\nclass A:\n    """Doc."""\n    k = 1\n'
    module.write_text(original)
    (package / "other.py").write_text("y = 1\n")
    before = source_fingerprint([module, package / "other.py"], tmp_path)
    assert len(before) == 16 and before == source_fingerprint([package / "other.py", module], tmp_path)
    cosmetic = original.replace('"""Twice x."""', '"""Two times x, reworded."""').replace(
        "return 2 * x", "return 2*x  # a comment").replace('"""A layer."""', '"""Another text."""')
    module.write_text(cosmetic)
    assert source_fingerprint([module, package / "other.py"], tmp_path) == before
    for edit in (original.replace("return 2 * x", "return 3 * x"), original.replace("k = 1", "k = 2"),
                 original.replace('    """Twice x."""\n', '    """Twice x."""\n    x = x + 0\n')):
        module.write_text(edit)
        assert source_fingerprint([module, package / "other.py"], tmp_path) != before
    module.write_text(original)
    (package / "other.py").write_text("y = 2\n")
    assert source_fingerprint([module, package / "other.py"], tmp_path) != before

