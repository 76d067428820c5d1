"""Atomic writes (qlora_cli/core/files.py): a reader or a crash never sees half a file or half a folder."""

from __future__ import annotations

import os

import pytest

from qlora_cli.core.files import publish, remove_abandoned_staging, staged, staging_path, write_atomic


def test_write_atomic_replaces_a_file_whole(tmp_path):
    target = tmp_path / "summary.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_staging(tmp_path):
    target = tmp_path / "recipe.yaml"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged(target) as staging:
            staging.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_folder_is_swapped_whole(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.safetensors").write_text("old")
    with staged(target) as staging:
        staging.mkdir()
        (staging / "new.safetensors").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_cache_filled_first_by_another_process_wins(tmp_path):
    target = tmp_path / "converted"
    target.mkdir()
    (target / "config.json").write_text("theirs")
    staging = staging_path(target)
    staging.mkdir()
    (staging / "config.json").write_text("ours")
    assert publish(staging, target, replace=False) is False
    assert (target / "config.json").read_text() == "theirs" and not staging.exists()


def test_staging_names_are_private_to_the_process_and_keep_the_suffix(tmp_path):
    staging = staging_path(tmp_path / "rows.npz")
    assert str(os.getpid()) in staging.name and staging.suffix == ".npz" and staging.name.startswith(".")


def test_what_a_killed_process_staged_is_removed_and_a_running_one_s_is_kept(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "merged"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".merged.tmp-{int(finished.stdout)}"  # that process has exited
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"x" * 10)
    alive = staging_path(target)  # this process's own
    alive.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as running:
        other = tmp_path / f".merged.tmp-{running.pid}"
        other.mkdir()
        unrelated = tmp_path / ".merged-notes.tmp-1"
        unrelated.write_text("keep")
        assert remove_abandoned_staging(target) == [dead]
        running.stdin.close()
    assert not dead.exists() and alive.is_dir() and other.is_dir() and unrelated.read_text() == "keep"
