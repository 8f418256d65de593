"""A kept build keeps every module of its build, not only those its QEMU had loaded (pure file logic)."""

from __future__ import annotations

from pathlib import Path

from cprctl._qemu.build import Part, _unmapped_modules


def _tree(tmp_path: Path) -> Path:
    mods = tmp_path / "usr/lib/x86_64-linux-gnu/qemu"
    mods.mkdir(parents=True)
    for name in ("ui-opengl.so", "hw-display-virtio-gpu.so", "block-curl.so", "README", "libfoo.so"):
        (mods / name).write_text(name)
    (tmp_path / "usr/bin").mkdir()
    return mods


def test_the_modules_a_qemu_has_not_loaded_are_found_beside_its_executable(tmp_path: Path) -> None:
    mods = _tree(tmp_path)
    found = _unmapped_modules(str(tmp_path / "usr/bin/qemu-system-x86_64"), [])
    assert sorted(p.name for p in found) == ["block-curl.so", "hw-display-virtio-gpu.so", "ui-opengl.so"]
    assert all(p.source == str(mods / p.name) for p in found)


def test_loaded_modules_name_the_directory_and_are_not_taken_twice(tmp_path: Path) -> None:
    mods = _tree(tmp_path)
    loaded = Part("ui-opengl.so", "/proc/1/map_files/x", str(mods / "ui-opengl.so"))
    found = _unmapped_modules("/nowhere/bin/qemu", [loaded])
    assert sorted(p.name for p in found) == ["block-curl.so", "hw-display-virtio-gpu.so"]


def test_a_build_without_modules_has_none(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    assert _unmapped_modules(str(tmp_path / "bin/qemu"), []) == []
