"""Per-epoch reports from the workers: Ray Train reports (a barrier), rank 0's checkpoints and MLflow metrics.

Imported only where Ray Train runs (``train.loop`` on the workers), so Ray is imported at the top.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from moco_ray.core.backbone_io import plain_state_dict
from moco_ray.core.method import ContrastiveMethod
from moco_ray.tracking.history import EpochMetrics
from moco_ray.tracking.run_log import RunLog
from moco_ray.train.checkpoint import TrainState, rng_state, save_state
from moco_ray.train.keep_best import prune, write_metrics
from moco_ray.train.spec import RunSpec
from moco_ray.train.step import MixedPrecision


class Reporter:
    """What a rank sends out: every rank reports each epoch; rank 0 also checkpoints and writes the MLflow run.

    MLflow metrics are written only after the checkpoint that holds them is persisted (and from the checkpoint's
    history on restore), so a worker restart neither loses nor duplicates an epoch. An epoch logged past the
    restored checkpoint (persisted and logged, then lost to Ray's record: the driver killed before Ray registered
    it, a worker killed likewise) belonged to a discarded branch: :meth:`start` marks it and the epochs of this
    model are logged again over it.
    """

    def __init__(self, spec: RunSpec, rank: int, world: int) -> None:
        self.spec, self.rank, self.world = spec, rank, world
        self.run = RunLog(spec.tracking_uri, spec.run_id) if rank == 0 else None
        self.logged_through = -1  # the last epoch whose metrics this worker group's model has in MLflow

    def record_worker_nodes(self) -> None:
        """Tag the run with the Ray node of every worker, so a multi-node run shows which nodes took part."""
        node = ray.get_runtime_context().get_node_id()
        nodes: list[Any] = [node]
        if self.world > 1:
            nodes = [None] * self.world
            dist.all_gather_object(nodes, node)
        if self.run is not None:
            self.run.set_tags({"moco_ray.worker_nodes": ",".join(nodes)})

    def start(self, model: ContrastiveMethod, state: TrainState | None, why: str) -> None:
        """Rank 0, once the model is built and restored (``state``: the checkpoint, None when training from the
        start): the run's epochs logged past it are marked discarded (``why``: "resume", "a worker restart") and
        will be logged again from this model; tags name what a restore continued from."""
        if self.run is None:
            return
        self.logged_through = state.epoch if state is not None else -1
        self.run.mark_discarded(self.logged_through, why)
        if state is not None:
            self.note_restore(model, state)

    def note_restore(self, model: ContrastiveMethod, state: TrainState) -> None:
        """Tags that show what a restart continued from (the queue's digest proves it came back bit-exact)."""
        queue = model.queue
        if self.run is None or queue is None:
            return
        digest = hashlib.sha256(queue.keys.cpu().numpy().tobytes()).hexdigest()
        self.run.set_tags(
            {
                "moco_ray.restored_from_epoch": state.epoch + 1,  # its number, as the console counts
                "moco_ray.restored_queue_sha256": digest,
                "moco_ray.restored_queue_ptr": int(queue.ptr),
            }
        )

    def _rng_states(self) -> list[dict[str, Any]]:
        """RNG states of every rank: they travel in rank 0's checkpoint."""
        mine = rng_state()
        if self.world == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return gathered

    def report(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        epoch: int,
        global_step: int,
        history: list[EpochMetrics],
        last: bool,
        precision: MixedPrecision | None = None,
    ) -> None:
        """``ray.train.report`` of the last epoch's metrics on every worker (a dict, the names MLflow and Tune see);
        rank 0 attaches a checkpoint every ``train.checkpoint_every`` (``precision``: fp16's scaler state goes in
        it), then, with ``train.keep_best``, prunes the run dir itself (Ray keeps every checkpoint then)."""
        cfg = self.spec.config
        do_ckpt = last or (epoch + 1) % cfg.train.checkpoint_every == 0
        rngs = self._rng_states()
        if not (do_ckpt and self.rank == 0):
            ray.train.report(history[-1].report())
            return
        state = self.checkpoint_state(model, opt, epoch, global_step, history, rngs, precision)
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state)
            write_metrics(d, history[-1], global_step)  # what train.keep_best chooses by, without reading states
            ray.train.report(history[-1].report(), checkpoint=ray.train.Checkpoint.from_directory(d))
        assert self.run is not None
        self.run.log_epochs(history, after=self.logged_through)
        self.logged_through = epoch
        self._keep_best()

    def checkpoint_state(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        epoch: int,
        global_step: int,
        history: list[EpochMetrics],
        rngs: list[dict[str, Any]],
        precision: MixedPrecision | None,
    ) -> TrainState:
        """Rank 0's checkpoint of this epoch; fp16's scaler state is read here only (a host read of its scale)."""
        return TrainState(
            model=plain_state_dict(model),
            optimizer=opt.state_dict(),
            epoch=epoch,
            global_step=global_step,
            rng=rngs,
            history=history,
            config=self.spec.config.to_dict(),
            run_id=self.spec.run_id,
            scaler=precision.state_dict() if precision is not None else None,
        )

    def _keep_best(self) -> None:
        """Rank 0, after a checkpoint is persisted (``ray.train.report`` uploads it before returning): the run dir
        keeps the latest ``train.keep_checkpoints`` and the best by ``train.keep_best``, and the run's tags name
        the best so far. A storage that refuses the deletion costs disk, not the run."""
        t = self.spec.config.train
        if not t.keep_best or self.run is None:
            return
        try:
            best = prune(self.spec.run_dir, t.keep_checkpoints, metric=t.keep_best).best
        except OSError as e:
            why = f"moco-ray: warning: old checkpoints in {self.spec.run_dir} not removed ({e})"
            logging.getLogger(__name__).warning(self.spec.console(why))  # not print(): that reaches the driver twice
            return
        if best is not None:
            self.run.set_tags(best.tags(t.keep_best))
