"""Atomic writes: a failing writer leaves the target as it was and no temporary behind; a
finished one shows the whole new content; a folder swap keeps the old content until the rename."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fastgen_diffusers.io import (
    atomic_directory,
    atomic_file,
    atomic_path,
    commit_directory,
    remove_directory,
    write_json_atomic,
    write_text_atomic,
)


class Boom(RuntimeError):
    pass


def test_atomic_file_writes_the_whole_content(tmp_path):
    target = tmp_path / "notes.txt"
    with atomic_file(target) as f:
        f.write("first half, ")
        assert not target.exists()  # nothing visible before the block ends
        f.write("second half\n")
    assert target.read_text() == "first half, second half\n"
    assert os.listdir(tmp_path) == ["notes.txt"]

    with atomic_file(target, "wb") as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_file(target, "a"):
            pass


def test_failing_writer_leaves_target_unchanged_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_file(target) as f:
            f.write("partial")
            raise Boom
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]

    with pytest.raises(Boom):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise Boom
    assert os.listdir(tmp_path) == ["config.json"]

    # A writer that wrote nothing is an error, not an empty file.
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "new.bin"):
            pass
    assert os.listdir(tmp_path) == ["config.json"]


def test_atomic_path_temporary_is_a_hidden_sibling(tmp_path):
    target = tmp_path / "weights.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-")
        assert tmp.name.endswith("-weights.safetensors") and not tmp.exists()
        tmp.write_bytes(b"abc")
    assert target.read_bytes() == b"abc"


def test_written_files_get_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_json_and_text_writers(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "dir" / "c.json", {"b": 1, "a": [1, 2]})
    assert path == tmp_path / "sub" / "dir" / "c.json"
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True)
    text = write_text_atomic(tmp_path / "card.md", "line\r\nnext\n")
    assert text.read_bytes() == b"line\r\nnext\n"  # no newline translation


def test_directory_swap_keeps_old_content_until_the_rename(tmp_path):
    target = tmp_path / "transformer"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.bin").write_text("new")
        # Still building: the target shows only the old content.
        assert os.listdir(target) == ["old.bin"]
        assert tmp.name.startswith(".tmp-") and tmp.parent == tmp_path
    assert os.listdir(target) == ["new.bin"]
    assert os.listdir(tmp_path) == ["transformer"]  # the old content and the temporary are gone


def test_failing_directory_build_leaves_target_and_removes_temporary(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "index.json").write_text("{}")
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            (tmp / "shard-0").write_text("partial")
            raise Boom
    assert os.listdir(tmp_path) == ["cache"] and os.listdir(target) == ["index.json"]
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "fresh"):
            raise Boom
    assert os.listdir(tmp_path) == ["cache"]


def test_no_overwrite_keeps_the_first_writer(tmp_path):
    target = tmp_path / "abc"
    with atomic_directory(target, overwrite=False) as first:
        (first / "a").write_text("first")
        with atomic_directory(target, overwrite=False) as second:
            (second / "a").write_text("second")
        assert (target / "a").read_text() == "second"
    assert (target / "a").read_text() == "second"  # the later finish is discarded
    assert os.listdir(tmp_path) == ["abc"]


def test_commit_directory_moves_the_old_content_out_of_sight_first(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-5"
    target.mkdir()
    (target / "COMPLETE").write_text("5\n")
    tmp = tmp_path / ".checkpoint-5.tmp"
    tmp.mkdir()
    (tmp / "COMPLETE").write_text("5\n")
    (tmp / "model.safetensors").write_text("new")

    # When the rename in fails, the old content is put back under its name.
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        commit_directory(tmp, target)
    assert sorted(os.listdir(tmp_path)) == [".checkpoint-5.tmp", "checkpoint-5"]
    assert os.listdir(target) == ["COMPLETE"]

    monkeypatch.setattr(os, "replace", real_replace)
    assert commit_directory(tmp, target)
    assert sorted(os.listdir(target)) == ["COMPLETE", "model.safetensors"]
    assert os.listdir(tmp_path) == ["checkpoint-5"]


def test_remove_directory(tmp_path):
    old = tmp_path / "checkpoint-1"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "x").write_text("x")
    remove_directory(old)
    remove_directory(old)  # already gone: nothing to do
    assert os.listdir(tmp_path) == []
