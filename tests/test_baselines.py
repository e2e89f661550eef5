"""``import baselines`` registers every variant into the library's registry under its file name, and
a file registering another name is an import error that says what to rename."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_importing_baselines_registers_every_file_under_its_name():
    import baselines
    from sdn.models.blocks import block_builder, registered_blocks

    files = sorted(p.stem for p in (ROOT / "baselines").glob("*.py") if p.stem != "__init__")
    assert list(baselines.NAMES) == files == ["cnn", "cnn_matched", "sdn"]
    assert set(files) <= set(registered_blocks())
    assert all(block_builder(name).__module__ == f"baselines.{name}" for name in files)


def _import_copy(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess:
    shutil.copytree(ROOT / "baselines", tmp_path / "baselines")
    (tmp_path / "baselines" / f"{name}.py").write_text(source)
    (tmp_path / "sdn").symlink_to(ROOT / "sdn")
    return subprocess.run([sys.executable, "-c", "import baselines; print(baselines.NAMES)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


WRONG = '''
from sdn.models.blocks import ConvBlockFactory, register_blocks


@register_blocks("{registered}")
def build(config):
    return ConvBlockFactory()
'''


def test_a_file_registering_another_name_is_an_error_naming_the_rename(tmp_path):
    result = _import_copy(tmp_path, "my_conv", WRONG.format(registered="conv2"))
    assert result.returncode != 0
    assert "baselines/my_conv.py registers decoder blocks ['conv2']" in result.stderr
    assert "rename the file to baselines/conv2.py or register it as 'my_conv'" in result.stderr


@pytest.mark.parametrize("name", ["conv2"])
def test_a_file_registering_its_own_name_is_picked_up(tmp_path, name):
    result = _import_copy(tmp_path, name, WRONG.format(registered=name))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "('cnn', 'cnn_matched', 'conv2', 'sdn')"
