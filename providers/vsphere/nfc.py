"""OVF export through ExportVm and its HttpNfcLease.

The lease expires unless the client reports progress (HttpNfcLeaseProgress) well within its
timeout; a large disk downloading for an hour without that is what kills exports in other tools.
``LeaseKeeper`` reports from a timer thread for as long as the lease is held, whatever the data path
is doing. The lease ends with Complete on success and Abort on any failure.

The device URLs serve each disk as vSphere exports it (streamOptimized VMDK on ESXi); the files are
stored as served, with the OVF descriptor from OvfManager.CreateDescriptor and a SHA-256 manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hypersdk.atomic import atomic_file
from hypersdk.errors import SourceError
from hypersdk.io import IO_CHUNK
from providers.vsphere.connection import fault_message
from providers.vsphere.download import DatastoreReader

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Reports lease progress every ``interval`` seconds from a daemon thread until stopped."""

    def __init__(self, lease, interval: float, percent: Callable[[], int]):
        self.lease = lease
        self.interval = interval
        self.percent = percent
        self.reports = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nfc-lease-keeper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lease.HttpNfcLeaseProgress(percent=max(0, min(99, int(self.percent()))))
                self.reports += 1
            except Exception as exc:  # noqa: BLE001 - recorded; the transfer decides what to do
                self.error = exc
                log.warning("lease progress report failed: %s", exc)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_ready(lease, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = lease.state
        if state == "ready":
            return
        if state == "error":
            raise SourceError(f"export lease failed: {fault_message(lease.error)}")
        if time.monotonic() > deadline:
            raise SourceError(f"export lease not ready after {timeout:.0f} s (state {state})")
        time.sleep(0.2)


def export_ovf(
    session,
    vm_ref,
    dest: str | os.PathLike,
    *,
    workers: int = 4,
    keepalive: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Export the (powered-off) VM to ``dest``/<name>.ovf + disks + .mf. Returns what was written.

    Files appear under their final names only once complete (temp name, fsync, rename)."""
    from pyVmomi import vim, vmodl

    name = vm_ref.name
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        lease = vm_ref.ExportVm()
    except vim.fault.InvalidPowerState as exc:
        state = getattr(exc, "existingState", None) or "not powered off"
        raise SourceError(
            f"VM {name!r} is {state}: ExportVm (OVF) needs it powered off; "
            "export a running VM through a snapshot instead (hyperctl migrate)"
        ) from None
    except vim.fault.NotAuthenticated:
        raise  # the source logs in again and retries
    except vmodl.MethodFault as exc:
        raise SourceError(f"ExportVm of {name!r} failed: {fault_message(exc)}") from None
    done = [0]
    written: dict = {"ovf": None, "disks": [], "manifest": None}
    try:
        wait_ready(lease)
        info = lease.info
        total = sum(max(0, u.fileSize or 0) for u in info.deviceUrl) or 1
        hashes: dict[str, str] = {}
        ovf_files = []
        if info.leaseTimeout:  # report at least 3 times per lease timeout
            keepalive = min(keepalive, max(1.0, info.leaseTimeout / 3))
        with LeaseKeeper(lease, keepalive, lambda: 100 * done[0] // total) as keeper:
            for dev in info.deviceUrl:
                if not dev.disk:
                    continue
                url = dev.url.replace("*", f"{session.creds.host}:{session.creds.port}", 1)
                target = f"{name}-{dev.targetId or os.path.basename(url)}"

                def count(n: int) -> None:
                    done[0] += n
                    if progress is not None:
                        progress(n)

                reader = DatastoreReader(
                    session.http(),
                    url,
                    0,
                    name=target,
                    cookie=lambda: session.cookie,
                    workers=workers,
                    progress=count,
                )
                reader.size = reader.file_size
                digest = hashlib.sha256()
                try:
                    with atomic_file(dest / target) as sink:
                        for off in range(0, reader.size, IO_CHUNK):
                            data = reader.read(off, min(IO_CHUNK, reader.size - off))
                            sink.write(data)
                            digest.update(data)
                finally:
                    reader.close()
                hashes[target] = digest.hexdigest()
                written["disks"].append(str(dest / target))
                ovf_files.append(
                    vim.OvfManager.OvfFile(deviceId=dev.key, path=target, size=reader.size)
                )
            params = vim.OvfManager.CreateDescriptorParams(name=name, ovfFiles=ovf_files)
            desc = session.content.ovfManager.CreateDescriptor(obj=vm_ref, cdp=params)
            if getattr(desc, "error", None):
                raise SourceError(f"OVF descriptor of {name!r}: {fault_message(desc.error[0])}")
            ovf_bytes = desc.ovfDescriptor.encode()
            written["keepalive_reports"] = keeper.reports
        ovf_path = dest / f"{name}.ovf"
        with atomic_file(ovf_path) as sink:
            sink.write(ovf_bytes)
        hashes = {ovf_path.name: hashlib.sha256(ovf_bytes).hexdigest(), **hashes}
        mf = "".join(f"SHA256({k})= {v}\n" for k, v in hashes.items()).encode()
        with atomic_file(dest / f"{name}.mf") as sink:
            sink.write(mf)
        written["ovf"], written["manifest"] = str(ovf_path), str(dest / f"{name}.mf")
        lease.HttpNfcLeaseProgress(percent=100)
        lease.HttpNfcLeaseComplete()
    except BaseException as exc:
        try:
            fault = vmodl.LocalizedMethodFault(localizedMessage=str(exc)[:500])
            lease.HttpNfcLeaseAbort(fault=fault)
        except Exception as abort_exc:  # noqa: BLE001 - the original failure matters more
            log.warning("lease abort failed: %s", abort_exc)
        raise
    return written
