"""A state file moco-ray did not write (a pickle that would run code, a damaged archive, other keys) is refused by
``load_state`` in one line naming the checkpoint, and nothing in it runs; a ``file://`` URI loads as a path does.

Before: a tampered checkpoint raised torch's 21-line ``UnpicklingError`` whose text suggests ``weights_only=False``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from checkpoint_states import train_state

from moco_ray.train.checkpoint import STATE_FILE, NotACheckpoint, load_state, save_state


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: the marker shows whether anything in the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_a_pickle_that_would_run_code_is_refused_in_one_line_and_nothing_runs(tmp_path):
    """Mutation checked by hand: without the ``pickle.UnpicklingError`` branch in ``_read_state`` this raised
    torch's multi-line UnpicklingError (not a NotACheckpoint)."""
    ckpt = tmp_path / "checkpoint_x"
    save_state(ckpt, train_state({"w": torch.zeros(2)}, epoch=0))
    marker = tmp_path / "code-ran"
    torch.save({"model": _RunsCode(marker), "epoch": 0}, ckpt / STATE_FILE)  # what an attacker would drop there
    with pytest.raises(NotACheckpoint) as info:
        load_state(ckpt)
    msg = _one_line(info)
    assert msg.startswith(f"checkpoint {ckpt} is not a moco-ray checkpoint: ")
    assert "weights_only" not in msg  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()


def test_a_damaged_archive_and_foreign_keys_are_refused_in_one_line(tmp_path):
    """Mutation checked by hand: ``load_state`` returning ``TrainState.from_dict(state)`` unguarded raised a bare
    ``KeyError: 'model'`` for the foreign dict."""
    damaged, foreign = tmp_path / "damaged", tmp_path / "foreign"
    path = save_state(damaged, train_state({"w": torch.zeros(64)}, epoch=0))
    path.write_bytes(path.read_bytes()[:-200])  # the zip's central directory gone, the local headers kept
    foreign.mkdir()
    torch.save({"weights": torch.zeros(2)}, foreign / STATE_FILE)
    for ckpt, why in ((damaged, "cannot be read"), (foreign, "lacks moco-ray's training state")):
        with pytest.raises(NotACheckpoint) as info:
            load_state(ckpt)
        assert why in _one_line(info)
    assert isinstance(NotACheckpoint(damaged, "x"), ValueError)  # the CLI's one-line error, exit 2


def test_a_file_uri_loads_like_its_path(tmp_path):
    """Checkpoints kept on remote storage come as URIs (``latest_checkpoint`` of an s3:// run dir).

    Mutation checked by hand: without the URI branch of ``_open_state`` this raised FileNotFoundError.
    """
    save_state(tmp_path, train_state({"w": torch.arange(3.0)}, epoch=4))
    state = load_state(f"file://{tmp_path}")
    assert state.epoch == 4 and torch.equal(state.model["w"], torch.arange(3.0))
