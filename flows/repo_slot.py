"""One run at a time writes a VM's repository, queued in Prefect.

Runs that write a VM's points on a target (backup and migrate exports, forget) take one slot of
a Prefect global concurrency limit named after the VM and the target, limit 1, before they take
the repository's lock object (hypersdk.repository.locks). A second run then waits in Prefect:
the UI's concurrency page shows the slot held and by which flow run, and the waiting run's log
says what it waits for and for whom (the holder named by the lock object). The lock object stays
the guard that works without Prefect and across Prefect servers.

Prefect 3.9 no longer creates a missing limit when a slot is asked for (and a missing limit is a
no-op), so the limit is created here, active, with limit 1; a limit an operator changed (a
higher limit, or made inactive) is respected and logged.

The slot is taken with the client's lease API directly (not ``prefect.concurrency``) so that a
waiting run can free the slot of a dead holder. A run holds its slot under a lease of
LEASE_SECONDS (the least the server accepts), renewed by a thread every third of that, and
records the lease id in its lock object's owner (``slot_lease``). A run killed with SIGKILL
never releases its lease, and only a server's lease-expiry service revokes an expired one (a
test server or Prefect's ephemeral mode runs none): so while it waits a run reads the lock
object, and when its holder is provably dead (hypersdk.repository.liveness: same machine, boot
and pid namespace, the process gone) it releases the lease that holder names, marks that
holder's flow run Crashed, and asks again at once. A holder that is alive, or on another
machine, is waited for; a server's lease expiry frees a vanished remote holder's slot after the
lease. A run that gets the slot at once still marks a dead holder's flow run Crashed (its
lease expired meanwhile; nothing else ends that run in the UI).

In ephemeral mode each process has its own temporary server: leases kept in its memory would die
with it and leave the slot taken for good, so hypersdk.localapi keeps them in files under
PREFECT_HOME (Prefect's filesystem lease storage), shared like the database.

What remains: a run killed between taking the slot and writing its lock object has named its
lease nowhere. Its slot is freed only by lease expiry: LEASE_SECONDS later by a Prefect server's
services, never in ephemeral mode (there the next run waits SLOT_WAIT and fails naming the
limit; ``prefect gcl delete <name>`` frees it, the next run creates the limit again).

Outside a Prefect run (the engine used on its own) this does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from hypersdk.errors import RepositoryLockedError
from hypersdk.repository.layout import vm_prefix
from hypersdk.repository.liveness import dead_holder
from hypersdk.repository.locks import LOCK_NAME, LockRecord, read_lock

PREFIX = "hypersdk-repo"
SLOT_WAIT = 12 * 3600.0  # seconds a run waits for the slot before it gives up
LEASE_SECONDS = 60.0  # the server's minimum: a holder that vanishes frees its slot this late
POLL_MAX = 5.0  # seconds between asks while waiting, at most (the server's Retry-After else)
_PLAIN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def limit_name(target_url: str, vm: str) -> str:
    """``hypersdk-repo:<sha256(target URL)[:12]>:<vm>``. ``target_url`` is the target's own
    ``url`` (normalised, never credentials: the same repository gives the same name however it
    was spelled). A VM name with characters a limit name cannot hold (``/ % & < >``, or any
    outside letters, digits, ``. _ -``) or over 64 characters shows its safe part and a hash."""
    where = hashlib.sha256(target_url.encode()).hexdigest()[:12]
    if _PLAIN.fullmatch(vm):
        shown = vm
    else:
        digest = hashlib.sha256(vm.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        shown = f"{_UNSAFE.sub('_', vm)[:48]}~{digest}"
    return f"{PREFIX}:{where}:{shown}"


def _in_a_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def ensure_limit(name: str) -> tuple[int, bool]:
    """Create the limit ``name`` (limit 1, active) unless it exists; its (limit, active)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
            return found.limit, found.active
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it just now
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
            return 1, True
        found = client.read_global_concurrency_limit_by_name(name)
        return found.limit, found.active


def _span(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def _uuid(value: Any) -> uuid.UUID | None:
    """``value`` as a UUID if it is one (lock owners come from the target: checked)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _retry_after(response: Any) -> float:
    """The server's Retry-After, bounded to (0.05, POLL_MAX] seconds."""
    try:
        wait = float(response.headers.get("Retry-After", POLL_MAX))
    except (TypeError, ValueError):
        return POLL_MAX
    return min(max(wait, 0.05), POLL_MAX) if math.isfinite(wait) else POLL_MAX


class _Slot:
    """Taking, keeping and giving back one lease of the limit ``name``."""

    def __init__(self, name: str, target: Any, vm: str, logger: Any):
        self.name, self.target, self.vm, self.logger = name, target, vm, logger
        self.lock_key = f"{vm_prefix(vm)}{LOCK_NAME}"
        self._freed: set[uuid.UUID] = set()  # dead holders' leases released already
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # --- taking -------------------------------------------------------------------------
    def take(self, holder: Any) -> uuid.UUID:
        """Ask until a slot is free, freeing a dead holder's; RepositoryLockedError after
        SLOT_WAIT seconds."""
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

        asked = time.monotonic()
        deadline = asked + SLOT_WAIT
        shown: str | None = ""  # the token of the lock holder the log last named
        with get_client(sync_client=True) as client:
            while True:
                try:
                    response = client.increment_concurrency_slots_with_lease(
                        names=[self.name],
                        slots=1,
                        mode="concurrency",
                        lease_duration=LEASE_SECONDS,
                        holder=holder,
                    )
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 423:  # 423 Locked: no free slot
                        raise
                    pause = _retry_after(exc.response)
                else:
                    lease = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
                    waited = time.monotonic() - asked
                    self.logger.info(
                        "repository slot %s: taken%s",
                        self.name,
                        f" after {waited:.1f} s" if waited >= 1 else "",
                    )
                    # a dead holder whose lease the server let expire meanwhile: its flow run
                    # still shows Running (and under a limit above 1 its lease still counts)
                    self._free_dead(client, self._holder(), waiting=False)
                    return lease.lease_id
                record = self._holder()
                if self._free_dead(client, record):
                    continue  # at once: the slot is free now
                who = self._who(record)
                if (record.token if record else None) != shown:
                    self.logger.info("repository slot %s: waiting for %s", self.name, who)
                    shown = record.token if record else None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RepositoryLockedError(
                        f"another run of VM {self.vm!r} on {self.target.url} held the "
                        f"concurrency limit {self.name} for {_span(SLOT_WAIT)} ({who}): gave "
                        "up waiting"
                    )
                time.sleep(min(pause, left))

    def _holder(self) -> LockRecord | None:
        """The VM's lock object, which names the slot's holder (None: there is none, or it
        cannot be read now: a network hiccup must not end the wait)."""
        try:
            return read_lock(self.target, self.lock_key)
        except Exception as exc:  # noqa: BLE001 - only shown
            self.logger.debug("repository slot %s: cannot read the lock: %s", self.name, exc)
            return None

    @staticmethod
    def _who(record: LockRecord | None) -> str:
        if record is None:
            return "a run that has not written the repository lock (yet)"
        return f"the run the repository lock names, {record.describe(time.time())}"

    def _free_dead(self, client: Any, record: LockRecord | None, waiting: bool = True) -> bool:
        """Release the slot lease of ``record``'s holder if that holder is provably dead, and
        mark its flow run Crashed; True when a lease was released (once per lease)."""
        if record is None or not record.valid:
            return False
        lease = _uuid(record.owner.get("slot_lease"))
        if lease is None or lease in self._freed:
            return False
        why = dead_holder(record.owner)
        if why is None:
            return False  # alive, or not provably dead from here: waited for
        self._freed.add(lease)
        try:  # a lease the server revoked already: nothing happens
            client.release_concurrency_slots_with_lease(lease)
        except Exception as exc:  # noqa: BLE001 - the wait goes on
            self.logger.warning(
                "repository slot %s: cannot release the lease of a dead holder: %s", self.name, exc
            )
            return False
        self.logger.warning(
            "repository slot %s: %s of a dead holder, %s (%s)",
            self.name,
            "released the slot" if waiting else "taken; released the leftover slot lease",
            record.describe(time.time()),
            why,
        )
        run = _uuid(record.owner.get("flow_run_id"))
        if run is not None:
            self._crash(client, run, why)
        return True

    def _crash(self, client: Any, run_id: uuid.UUID, why: str) -> None:
        """Mark the dead holder's flow run Crashed (unless it already ended), so the UI stops
        showing it Running."""
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Crashed

        try:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return
            client.set_flow_run_state(
                run_id,
                Crashed(message=f"its process died ({why}); found by a run taking {self.name}"),
                force=True,
            )
        except ObjectNotFound:
            return  # a run of another Prefect server
        except Exception as exc:  # noqa: BLE001 - cosmetic: the slot is free
            self.logger.warning("cannot mark flow run %s Crashed: %s", run_id, exc)
            return
        self.logger.warning("flow run %s (%s) marked Crashed: %s", run_id, run.name, why)

    # --- keeping and giving back ----------------------------------------------------------
    def keep(self, lease: uuid.UUID) -> None:
        """Renew the lease every LEASE_SECONDS / 3 in a daemon thread until ``release``."""
        context = contextvars.copy_context()  # the run's settings (API URL) and logger
        self._renewer = threading.Thread(
            target=context.run,
            args=(self._renew, lease),
            name="repository-slot-lease",
            daemon=True,
        )
        self._renewer.start()

    def _renew(self, lease: uuid.UUID) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while not self._stop.wait(LEASE_SECONDS / 3):
                try:
                    client.renew_concurrency_lease(lease, LEASE_SECONDS)
                except Exception as exc:  # noqa: BLE001 - the lock object still guards
                    self.logger.warning(
                        "repository slot %s: lease renewal failed (%s); the repository lock "
                        "still keeps other runs out",
                        self.name,
                        exc,
                    )

    def release(self, lease: uuid.UUID) -> None:
        """Stop renewing and give the slot back; never raises (an error is only logged)."""
        from prefect.client.orchestration import get_client

        self._stop.set()
        thread, self._renewer = self._renewer, None
        if thread is not None:
            thread.join(timeout=10)
        try:
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots_with_lease(lease)
        except Exception as exc:  # noqa: BLE001 - the lease expires on its own
            self.logger.warning(
                "repository slot %s: cannot release it (%s); its lease expires in %g s",
                self.name,
                exc,
                LEASE_SECONDS,
            )


@contextlib.contextmanager
def repository_slot(target: Any, vm: str) -> Iterator[str | None]:
    """Hold the VM's repository slot on ``target`` (an opened target) for the block, yielding
    its lease id (inside a Prefect run; elsewhere a no-op yielding None): the caller records it
    in its lock object's owner as ``slot_lease``. RepositoryLockedError naming the limit when
    the slot stays taken for SLOT_WAIT seconds."""
    if not _in_a_run():
        yield None
        return
    from prefect import get_run_logger, runtime
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    logger = get_run_logger()
    name = limit_name(target.url, vm)
    limit, active = ensure_limit(name)
    if not active or limit != 1:
        logger.warning(
            "concurrency limit %s is %s: runs of %r on %s are kept apart by the repository "
            "lock only",
            name,
            "inactive" if not active else f"set to {limit}",
            vm,
            target.url,
        )
    run_id = runtime.flow_run.id
    holder = ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None
    logger.info("repository slot %s: taking it (one run of %r at a time)", name, vm)
    slot = _Slot(name, target, vm, logger)
    lease = slot.take(holder)
    try:
        slot.keep(lease)
        yield str(lease)
    finally:
        slot.release(lease)
