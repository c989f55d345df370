"""latest_checkpoint: resume takes the newest whole checkpoint of a run's storage and skips one cut short."""

from __future__ import annotations

import torch
from checkpoint_states import train_state

from moco_ray.jobs.resolve import latest_checkpoint
from moco_ray.train.checkpoint import STATE_FILE, is_complete, load_state, save_state


def test_resume_skips_a_checkpoint_cut_short_while_being_copied(tmp_path, capsys):
    """A Ctrl-C while Ray copies a reported checkpoint into the run's storage leaves a truncated state.pt in the
    newest checkpoint directory (seen in CI: resume then died in torch.load). Resume takes the newest whole one."""
    weights = {"w": torch.randn(64, 64)}
    old = save_state(tmp_path / "checkpoint_2026-12-03_00-00-00.000000", train_state(weights, 0))
    new = save_state(tmp_path / "checkpoint_2026-12-03_00-00-09.000000", train_state(weights, 1))
    whole = new.read_bytes()
    assert is_complete(old) and is_complete(new)
    assert latest_checkpoint(str(tmp_path)) == str(new.parent)
    for cut in (1, 21, 22, 100, len(whole) // 2, len(whole) - 1):  # inside the end record, the directory, the data
        new.write_bytes(whole[: len(whole) - cut])
        assert not is_complete(new), cut
        assert latest_checkpoint(str(tmp_path)) == str(old.parent)
        assert f"skipping {new.parent.name}: its {STATE_FILE} is incomplete" in capsys.readouterr().out
    assert load_state(latest_checkpoint(str(tmp_path))).epoch == 0
    old.write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)) is None  # nothing whole: the caller's "no checkpoint found"
