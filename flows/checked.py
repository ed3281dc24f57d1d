"""Flows whose parameters are checked before a run exists, as ExportFlow does for exports.

Called from Python (``restore_vm(...)``, ``forget_backups(...)``), a parameter mistake that
needs no repository look-up (a URL with a secret, an empty retention policy, a relative output
path) is one typed exception at once, with no flow run created. Deployment runs do not pass
through ``__call__``: each flow body runs the same check first, so those runs fail with the same
one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect import Flow
from prefect.utilities.callables import get_call_parameters

from flows.logs import route_engine_logs

if TYPE_CHECKING:
    from hypersdk.crypto.keys import KeySpec

# Flow.__call__'s own keyword arguments, not flow parameters
_ENGINE_OPTIONS = frozenset({"return_state", "wait_for"})


class CheckedFlow(Flow):
    """A Flow that runs ``check(parameters)`` before creating a run."""

    check: Callable[[dict[str, Any]], object]

    def __call__(self, *args: Any, **kwargs: Any):
        call = {k: v for k, v in kwargs.items() if k not in _ENGINE_OPTIONS}
        self.check(get_call_parameters(self.fn, args, call))
        return super().__call__(*args, **kwargs)


def checked_flow(
    name: str, doc: str, check: Callable[[dict[str, Any]], object]
) -> Callable[[Callable], CheckedFlow]:
    """Decorator: ``fn`` as a CheckedFlow named ``name``, documented by ``doc`` (its ``Args:``
    section describes each parameter in the UI's run form), engine logs routed to the run."""

    def wrap(fn: Callable) -> CheckedFlow:
        fn.__doc__ = doc
        route_engine_logs()
        flow = CheckedFlow(fn=fn, name=name, log_prints=True, validate_parameters=True)
        flow.check = check
        return flow

    return wrap


def checked_target(params: dict[str, Any]) -> str:
    """The run's target URL (the default when none): no secret in it, a known scheme with
    valid options."""
    from hypersdk import config
    from hypersdk.urls import check_url
    from providers import open_target

    target = params.get("target") or config.default_target_url()
    check_url(target, "target URL")
    with open_target(target):
        pass
    return target


def checked_key(params: dict[str, Any]) -> KeySpec | None:
    """The run's key reference (``encryption``) as a KeySpec, or None."""
    from pydantic import ValidationError

    from hypersdk.crypto.keys import KeySpec
    from hypersdk.errors import InvalidParameterError

    key = params.get("encryption")
    if key is None or isinstance(key, KeySpec):
        return key
    try:
        return KeySpec.model_validate(key)
    except ValidationError as exc:
        raise InvalidParameterError(f"invalid encryption: {exc.errors()[0]['msg']}") from None
