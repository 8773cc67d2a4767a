import os
import stat

import pytest

from loratools.errors import OutputExistsError
from loratools.io.atomic import TEMP_PREFIX, atomic_output, check_output


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_directory_output_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_output(target) as tmp:
        (tmp / "f.txt").write_text("x")
        assert not target.exists()
    assert (target / "f.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o755 == 0o755 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing(tmp_path, exc):
    target = tmp_path / "out"
    with pytest.raises(exc):
        with atomic_output(target) as tmp:
            (tmp / "partial").write_text("half")
            raise exc()
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_existing_output_refused_without_force(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        check_output(target, force=False)
    with pytest.raises(FileExistsError):
        with atomic_output(target, directory=False):
            pass
    assert target.read_text() == "old"


def test_force_replaces_only_after_success(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_output(target, force=True, directory=False) as tmp:
            tmp.write_text("new")
            raise ValueError
    assert target.read_text() == "old"
    with atomic_output(target, force=True, directory=False) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []
