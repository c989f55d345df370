"""Config errors of issue #18: YAML syntax errors name the file (or override) with line and column; a warm-up as
long as the run is clipped with one note instead of refused; ``data.max_corrupt_fraction`` is range-checked; an
MLflow experiment name MLflow would refuse is refused with the config (MLflow's own rule, compared with MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils import validation

from moco_ray.config import MLFLOW_MAX_EXPERIMENT_NAME_LENGTH, load_config
from moco_ray.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[2]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  epochs: 2\n  batch_size: [8\nmoco:\n  queue_size: 64\n")
    with pytest.raises(ValueError) as info:
        load_config(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}, line ") and "column" in msg and "YAML syntax error" in msg
    assert "\n" not in msg


def test_binary_config_file_is_one_line(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not a YAML text file"):
        load_config(p)


def test_override_yaml_syntax_error_names_the_override():
    with pytest.raises(ValueError, match=r"^override 'optim\.milestones=\[1, 2': line 1, column \d+: YAML syntax"):
        load_config(None, ["optim.milestones=[1, 2"])


def test_warmup_longer_than_run_is_clipped_once(capsys):
    q = REPO / "experiments" / "quickstart.yaml"
    cfg = load_config(q, ["train.epochs=1"])
    assert cfg.optim.warmup_epochs == 0
    assert load_config(None, {"optim.warmup_epochs": 5, "train.epochs": 3}).optim.warmup_epochs == 2
    load_config(None, {"optim.warmup_epochs": 5, "train.epochs": 3})  # the same note is not repeated
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "warm-up cut" in ln]
    assert notes == [
        "moco-ray: note: optim.warmup_epochs 1 >= train.epochs 1: warm-up cut to 0",
        "moco-ray: note: optim.warmup_epochs 5 >= train.epochs 3: warm-up cut to 2",
    ]


def test_negative_warmup_is_still_refused():
    with pytest.raises(ValueError, match=r"optim\.warmup_epochs: -1 is out of range"):
        load_config(None, {"optim.warmup_epochs": -1, "train.epochs": 3})


def test_schedule_never_lets_the_warmup_fill_the_run():
    from moco_ray.config import OptimConfig

    o = OptimConfig(schedule="cosine", warmup_epochs=4)  # built directly, not through load_config
    assert lr_at(o, 1.0, 1, 0, 10, 3) == pytest.approx(1 / 2)  # clipped to 2 warm-up epochs
    assert lr_at(o, 1.0, 2, 0, 10, 3) == pytest.approx(1.0)  # cosine starts after them


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_max_corrupt_fraction_range(bad):
    with pytest.raises(ValueError, match=r"data\.max_corrupt_fraction: .* is out of range; allowed: 0 <= f <= 1"):
        load_config(None, {"data.max_corrupt_fraction": bad})
    assert load_config(None, {"data.max_corrupt_fraction": 1}).data.max_corrupt_fraction == 1.0


@pytest.mark.parametrize(
    ("name", "shown"), [("", "''"), ("e" * 501, "'" + "e" * 40 + r"'\.\.\. \(501 characters\)")], ids=["empty", "501"]
)
def test_experiment_name_mlflow_refuses_is_refused(name, shown):
    """Mutations: without ``check_experiment_name`` neither raises; with ``<`` for ``<=`` the 500-character name of
    the next test is refused."""
    with pytest.raises(ValueError, match=rf"^tracking\.experiment: {shown} is out of range; allowed: 1 to 500 "):
        load_config(None, {"tracking.experiment": name})


def test_experiment_name_rule_is_mlflows():
    """The replicated rule agrees with MLflow's own validation at its edges (fails when MLflow changes its limit)."""
    assert validation.MAX_EXPERIMENT_NAME_LENGTH == MLFLOW_MAX_EXPERIMENT_NAME_LENGTH
    longest = "e" * MLFLOW_MAX_EXPERIMENT_NAME_LENGTH
    validation._validate_experiment_name(longest)
    assert load_config(None, {"tracking.experiment": longest}).tracking.experiment == longest
    for refused in ("", longest + "e"):
        with pytest.raises(MlflowException):
            validation._validate_experiment_name(refused)
