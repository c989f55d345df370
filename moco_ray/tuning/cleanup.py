"""Free the resources of trials Tune stopped: their Ray Train placement groups outlive them.

When Tune stops a trial (ASHA, Ctrl-C) it kills the trial's actor and with it the TorchTrainer controller, but the
workers' placement group is scoped to the job, not to the controller. Ray Train V2 frees it from a detached
PlacementGroupCleaner actor that asks the State API whether the controller is alive; without the dashboard
(``include_dashboard=False``, or Ray without its ``default`` extra) that query fails forever, the group keeps its
CPUs/GPUs, and later trials wait for resources (seen with Ray 2.60: a 2-CPU sweep hung on its Ray Data tasks).

This removes every placement group whose creating actor is dead and that is not detached, i.e. one nobody can use
any more: what GCS itself would remove once the job ended. It reads the GCS table through Ray's private state
accessor (the public ``placement_group_table`` drops the creator fields), so it never raises: on any error it
logs and leaves the groups alone.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def remove_orphaned_placement_groups() -> int:
    """Remove placement groups whose (non-driver) creator actor died; returns how many were removed."""
    try:
        import ray  # lazy: in the try: Ray's private API may change; failing to import it must not fail the sweep
        from ray._private.state import state  # lazy: as above
        from ray.core.generated import gcs_pb2  # lazy: as above
        from ray.util.placement_group import PlacementGroup, remove_placement_group  # lazy: as above

        if not ray.is_initialized():
            return 0
        removed = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if pg.is_detached or not pg.creator_actor_dead or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED:
                continue
            if not pg.creator_actor_id or ray.ActorID(pg.creator_actor_id).is_nil():
                continue  # created by a driver (Tune's own trial groups): alive as long as the job
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        return removed
    except Exception as e:  # a best-effort workaround must not fail the sweep
        logger.warning("could not check for orphaned placement groups: %s", e)
        return 0
