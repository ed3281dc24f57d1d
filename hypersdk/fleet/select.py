"""Which VMs a fleet run covers: an explicit list, or a selector over a source's inventory
(name patterns, tags, folder), split into ordered groups (database VMs before app VMs).

Tags and folders come from a VM's ``annotations`` (what each source knows of them): a tag
``env=prod`` matches the annotation ``env`` with value ``prod``; a bare tag ``nightly`` matches
an entry of the comma-separated ``tags`` annotation; ``folder`` matches the ``folder``
annotation or any folder under it (``/DC/vm/prod`` covers ``/DC/vm/prod/db``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from pydantic import BaseModel, ConfigDict, Field

from hypersdk.errors import InvalidParameterError
from hypersdk.models import VMInfo

MAX_VMS = 10_000  # one fleet run; more is a mistake in a pattern, not a fleet


class Selector(BaseModel):
    """A filter over a source's inventory; every given criterion must hold."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(
        default_factory=list,
        description="Glob patterns on the VM name (fnmatch, case-sensitive); any may match. "
        "Empty: every VM.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Glob patterns of VM names left out."
    )
    tags: list[str] = Field(
        default_factory=list,
        description="Every tag must be present: key=value (an annotation) or a bare name "
        "(an entry of the comma-separated 'tags' annotation).",
    )
    folder: str | None = Field(
        default=None, description="The VM's 'folder' annotation is this folder or under it."
    )

    def matches(self, vm: VMInfo) -> bool:
        if self.names and not any(fnmatchcase(vm.name, p) for p in self.names):
            return False
        if any(fnmatchcase(vm.name, p) for p in self.exclude):
            return False
        if not all(_has_tag(vm, t) for t in self.tags):
            return False
        return self.folder is None or _in_folder(vm.annotations.get("folder"), self.folder)


def _has_tag(vm: VMInfo, tag: str) -> bool:
    key, eq, value = tag.partition("=")
    if eq:
        return vm.annotations.get(key.strip()) == value.strip()
    listed = {t.strip() for t in vm.annotations.get("tags", "").split(",")}
    return tag.strip() in listed


def _in_folder(folder: str | None, wanted: str) -> bool:
    if folder is None:
        return False
    have, want = folder.strip("/").split("/"), wanted.strip("/").split("/")
    return have[: len(want)] == want


def select_vms(inventory: Iterable[VMInfo], selector: Selector) -> list[str]:
    """Names of the inventory's VMs the selector matches, sorted, each once."""
    names = sorted({vm.name for vm in inventory if selector.matches(vm)})
    if len(names) > MAX_VMS:
        raise InvalidParameterError(
            f"the selector matches {len(names)} VMs, more than one fleet run takes ({MAX_VMS})"
        )
    return names


def plan_groups(vms: Sequence[str], groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """``vms`` in ordered groups: each VM in the first group with a pattern matching its name,
    VMs no group matches in a last group; empty groups dropped, order inside a group kept.
    No groups: one group of all VMs."""
    seen: set[str] = set()
    unique = [v for v in vms if not (v in seen or seen.add(v))]
    if not groups:
        return [unique] if unique else []
    planned: list[list[str]] = [[] for _ in groups]
    rest: list[str] = []
    for vm in unique:
        for i, patterns in enumerate(groups):
            if any(fnmatchcase(vm, p) for p in patterns):
                planned[i].append(vm)
                break
        else:
            rest.append(vm)
    return [g for g in [*planned, rest] if g]
