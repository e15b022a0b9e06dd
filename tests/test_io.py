"""Atomic outputs under a stop landing anywhere: the previous output stays whole, no temp path stays."""

import os

import pytest

from ftq import io
from ftq.processes import Stopped


def _stop_on_call(monkeypatch, module, name, call_number):
    original, calls = getattr(module, name), []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == call_number:
            raise Stopped(15)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, stopping)


@pytest.mark.parametrize("where", ["mode", "mkdtemp", "body", "first_rename", "second_rename"])
def test_a_stop_anywhere_in_atomic_dir_keeps_the_old_output_and_no_temp_path(tmp_path, monkeypatch, where):
    target = tmp_path / "build"
    target.mkdir()
    (target / "model.gguf").write_text("previous")
    if where == "mode":  # the line between mkdtemp and the body: what the SIGTERM in CI hit
        _stop_on_call(monkeypatch, io, "_default_mode", 1)
    elif where == "mkdtemp":  # the folder exists, mkdtemp has not returned
        real = io.tempfile.mkdtemp

        def made_then_stopped(**kwargs):
            real(**kwargs)
            raise Stopped(15)

        monkeypatch.setattr(io.tempfile, "mkdtemp", made_then_stopped)
    elif where in ("first_rename", "second_rename"):
        _stop_on_call(monkeypatch, type(target), "rename", 1 if where == "first_rename" else 2)
    with pytest.raises(Stopped):
        with io.atomic_dir(target) as tmp:
            (tmp / "model.gguf").write_text("new")
            if where == "body":
                raise Stopped(15)
    assert sorted(os.listdir(tmp_path)) == ["build"]
    assert (target / "model.gguf").read_text() == "previous"


def test_a_stop_in_atomic_write_text_keeps_the_old_file_and_no_temp_path(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("previous")
    _stop_on_call(monkeypatch, io, "_default_mode", 1)
    with pytest.raises(Stopped):
        io.atomic_write_text(path, "new")
    assert os.listdir(tmp_path) == ["metrics.json"] and path.read_text() == "previous"


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "build"
    dead = tmp_path / "build.tmp-999999999-abc"
    live = tmp_path / f"build.tmp-{os.getppid()}-abc"
    dead.mkdir(), live.mkdir()
    with io.atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists() and live.exists() and (target / "x").read_text() == "1"
