"""scoped_env sets variables for the block and leaves the environment as it found it, also on an exception."""

from __future__ import annotations

import os

import pytest

from moco_ray.envvars import scoped_env


def test_scoped_env_restores_old_values_and_unsets_new_ones(monkeypatch):
    monkeypatch.setenv("MOCO_RAY_T_OLD", "before")
    monkeypatch.delenv("MOCO_RAY_T_NEW", raising=False)
    with pytest.raises(RuntimeError), scoped_env({"MOCO_RAY_T_OLD": "inside", "MOCO_RAY_T_NEW": "1"}):
        assert os.environ["MOCO_RAY_T_OLD"] == "inside" and os.environ["MOCO_RAY_T_NEW"] == "1"
        raise RuntimeError
    assert os.environ["MOCO_RAY_T_OLD"] == "before" and "MOCO_RAY_T_NEW" not in os.environ
