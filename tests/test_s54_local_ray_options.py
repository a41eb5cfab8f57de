"""Ray's options on the local engine: ``num_gpus=``, ``actors=`` and ``address=`` of a dataset run were ignored
when the engine was the local one (``salience explain DIR --num-gpus -1`` exited 0, ``--num-gpus 1`` ran on the
CPU as if understood); now each is refused before any file is written, said with the command's flags."""
from __future__ import annotations

import pytest

import salience
from salience import SalienceError

import test_s54_clidecide

files = test_s54_clidecide.files  # a module fixture: two 32 px PNGs in a folder, traced tiny nets
_run = test_s54_clidecide._run


@pytest.mark.parametrize("kw, said", [({"num_gpus": 1}, "num_gpus=1 given"), ({"num_gpus": -1}, "num_gpus=-1 given"),
                                      ({"actors": 2}, "actors=2 given"),
                                      ({"address": "127.0.0.1:6379"}, "address=127.0.0.1:6379 given")])
def test_rays_options_on_the_local_engine_are_refused(files, tmp_path, kw, said):
    with pytest.raises(SalienceError, match="the local engine runs no Ray actors") as e:
        salience.explain_dataset(str(files.three), str(files.two), ["vanilla"], tmp_path / "run", workers=0, **kw)
    assert said in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_num_gpus_zero_runs_on_the_local_engine(files, tmp_path, capsys):
    """``--num-gpus 0`` (the default's value) is no Ray option: the run goes on locally."""
    rc, _, err = _run(capsys, "explain", files.two, "--model", files.three, "--size", "32", "--num-gpus", "0",
                      "--workers", "0", "--out", tmp_path / "run")
    assert rc == 0, err
    assert salience.open_run(tmp_path / "run").table.num_rows == 2


def test_the_command_says_the_flag(files, tmp_path, capsys):
    rc, out, err = _run(capsys, "explain", files.two, "--model", files.three, "--size", "32", "--num-gpus", "-1",
                        "--workers", "0", "--out", tmp_path / "run")
    assert rc == 2 and out == "" and not (tmp_path / "run").exists()
    assert err == ("salience: error: --num-gpus -1 given, but the local engine runs no Ray actors: give --engine ray "
                   "(pip install 'salience[ray]') or leave them out (--device picks the local engine's device)\n"), err
