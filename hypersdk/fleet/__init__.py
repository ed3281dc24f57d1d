"""Fleet operations, engine side (no Prefect): which VMs of a source's inventory a fleet run
covers, in which ordered groups, and the names of the per-endpoint concurrency limits."""

from hypersdk.fleet.limits import endpoint_key, source_limit_name, target_limit_name
from hypersdk.fleet.select import Selector, plan_groups, select_vms

__all__ = [
    "Selector",
    "endpoint_key",
    "plan_groups",
    "select_vms",
    "source_limit_name",
    "target_limit_name",
]
