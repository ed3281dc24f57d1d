"""Options given by name (a URL's query, a format's keyword options): an unknown one is refused
with the list of those known, the same way everywhere."""

from __future__ import annotations

from collections.abc import Iterable

from hypersdk.errors import InvalidParameterError


def reject_unknown_options(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raise ``InvalidParameterError`` naming every option of ``given`` that ``what`` (e.g.
    "vsphere source", "format 'qcow2'") does not know, and the ones it does."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InvalidParameterError(
            f"{what} has no option {', '.join(unknown)} (known: {', '.join(known) or 'none'})"
        )
