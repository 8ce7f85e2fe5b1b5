import os
import stat

import pytest

from mgd_ray.files import atomic_write


def test_atomic_write_replaces_the_file_whole_with_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    assert atomic_write(path, lambda t: t.write_text("first")) == path
    atomic_write(path, lambda t: t.write_text("second"))
    assert path.read_text() == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def half_then_fail(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_the_suffix_ends_the_temporary_name(tmp_path):
    seen = []
    atomic_write(tmp_path / "c.npz", lambda t: (seen.append(t.name), t.write_bytes(b"x")), suffix=".tmp.npz")
    assert seen[0].startswith(".c.npz.") and seen[0].endswith(".tmp.npz")
