"""The workers of a local instance look Ray up in their own instance (``pin_ray_address``, their start-up hook).

With another Ray instance on the machine, Ray Train V2's PlacementGroupCleaner, which asks the State API about the
controller every second with no address, raised "Found multiple active Ray instances": a 30-line traceback on the
console of every run, and a cleaner that had stopped watching. The console of a real run beside a second instance
is checked in tests/cli/test_pretrain_interrupt.py (slow); here, the address the workers resolve.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_workers_resolve_their_own_instance(ray_local):
    """Mutation (failed here): ``pin_ray_address`` left out of ``quiet_worker_logs`` (no RAY_ADDRESS in the worker,
    which then resolves by scanning the machine's GCS processes)."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    def resolved() -> tuple[str | None, str]:
        import os

        from ray._private.services import canonicalize_bootstrap_address_or_die

        return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)

    own = ray.get_runtime_context().gcs_address
    assert ray.get(resolved.remote(), timeout=120) == (own, own)
