"""The local provider: a VM is a directory holding ``vm.json`` and its disk images.

``vm.json`` is a VMInfo (name, cpus, memory, firmware, disks, nics) whose disks name image files
relative to the VM directory (``backing``). A source URL points at a directory of such VMs
(``local:///var/lib/vms``) or at one VM directory.

Snapshots: a reflink clone (FICLONE) of each disk where the filesystem supports it (XFS, Btrfs):
later writes to the live disk cannot change it. Elsewhere (ext4, tmpfs) the documented fallback is
a *checked* promise: the VM must be powered off, and the disk's size, mtime and inode are recorded
and re-checked after the export (SnapshotError if they moved).

Change tracking: a block-hash map (hypersdk.blockmap) stored per snapshot under
``<vm>/.hypersdk/cbt/<disk>/<change_id>.bmap``; the diff of two maps is the changed-extent list.
An incremental run scans the snapshot to diff. A full run only probes for the data (a few MiB
read) and records its map from the export's own reads (``change_tracker``), so the disk is read
once; the change id is usable once that export is published. The tracker falls back to a scan
whenever the reads did not cover the data, so a saved map is always exact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from hypersdk.blockmap import BlockMap, BlockMapBuilder, block_size_for
from hypersdk.convert import scan_data_extents
from hypersdk.errors import (
    DiskReadError,
    FormatError,
    InvalidParameterError,
    SnapshotError,
    SourceError,
    VMNotFoundError,
)
from hypersdk.formats import open_image
from hypersdk.formats.base import DiskImage
from hypersdk.io import FileRangeReader
from hypersdk.models import DiskInfo, Snapshot, SnapshotDisk, VMInfo
from providers.base import DiskChanges, Source

DESCRIPTION = "vm.json"
STATE_DIR = ".hypersdk"
KEEP_MAPS = 8  # change maps kept per disk: older change ids fall back to a full export
FICLONE = 0x40049409


def load_vm(vm_dir: Path) -> VMInfo:
    path = vm_dir / DESCRIPTION
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise VMNotFoundError(f"{vm_dir}: no {DESCRIPTION} (not a VM directory)") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read VM description: {exc}") from None
    raw.setdefault("id", vm_dir.name)
    try:
        return VMInfo.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SourceError(f"{path}: invalid VM description at {where}: {first['msg']}") from None


def save_vm(vm_dir: Path, vm: VMInfo) -> None:
    from hypersdk.atomic import write_bytes_atomic

    write_bytes_atomic(vm_dir / DESCRIPTION, vm.model_dump_json(indent=2).encode())


def _reflink(src: Path, dst: Path) -> bool:
    """Clone ``src`` to ``dst`` sharing extents; False where the filesystem can't."""
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        return True
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        return False


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class LocalSource(Source):
    schemes = ("local",)

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()

    @classmethod
    def from_url(cls, url: str, **options) -> LocalSource:
        if options:
            raise InvalidParameterError(f"local source takes no options (got {', '.join(options)})")
        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path) if parts.scheme == "local" else url
        if not path:
            raise InvalidParameterError(f"local source URL has no path: {url!r}")
        return cls(path)

    @property
    def url(self) -> str:
        return f"local://{self.root}"

    # -- inventory ------------------------------------------------------------------------------
    def _vm_dirs(self) -> list[Path]:
        if (self.root / DESCRIPTION).is_file():
            return [self.root]
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: source directory does not exist")
        return sorted(p for p in self.root.iterdir() if (p / DESCRIPTION).is_file())

    def list_vms(self) -> list[VMInfo]:
        return [load_vm(d) for d in self._vm_dirs()]

    def vm_dir(self, name: str) -> Path:
        for d in self._vm_dirs():
            if d.name == name or load_vm(d).name == name:
                return d
        raise VMNotFoundError(f"VM {name!r} not found in {self.root}")

    def get_vm(self, name: str) -> VMInfo:
        return load_vm(self.vm_dir(name))

    def _disk_path(self, vm_dir: Path, disk: DiskInfo) -> Path:
        rel = disk.backing or f"{disk.name}.img"
        path = (vm_dir / rel).resolve()
        if not path.is_file():
            raise DiskReadError(f"disk {disk.name!r} of VM {vm_dir.name!r}: {path} does not exist")
        if not os.access(path, os.R_OK):
            raise DiskReadError(f"disk {disk.name!r} of VM {vm_dir.name!r}: {path} is not readable")
        return path

    # -- snapshots ------------------------------------------------------------------------------
    def create_snapshot(self, vm: str) -> Snapshot:
        vm_dir = self.vm_dir(vm)
        info = load_vm(vm_dir)
        snap_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        snap_dir = vm_dir / STATE_DIR / "snapshots" / snap_id
        snap_dir.mkdir(parents=True, exist_ok=False)
        disks, files, stamps = [], {}, {}
        cloned = True
        try:
            for disk in info.disks:
                live = self._disk_path(vm_dir, disk)
                clone = snap_dir / live.name
                if cloned and _reflink(live, clone):
                    files[disk.name] = str(clone)
                else:
                    cloned = False
                    files[disk.name] = str(live)
                    stamps[disk.name] = _stamp(live)
                disks.append(SnapshotDisk(disk=disk, change_id=snap_id))
            if not cloned:
                # No reflink here: only a stopped VM gives a point-in-time view of its files.
                if info.power_state != "poweredOff":
                    raise SnapshotError(
                        f"VM {info.name!r} is {info.power_state} and {vm_dir} is on a filesystem "
                        "without reflink clones: stop the VM (power_state poweredOff in vm.json) "
                        "or keep it on XFS/Btrfs"
                    )
                for name in list(files):  # drop any clones made before the fallback
                    files[name] = str(
                        self._disk_path(vm_dir, next(d for d in info.disks if d.name == name))
                    )
                    stamps.setdefault(name, _stamp(Path(files[name])))
        except BaseException:
            shutil.rmtree(snap_dir, ignore_errors=True)
            raise
        return Snapshot(
            id=snap_id,
            vm=info,
            disks=disks,
            consistency="clone" if cloned else "stopped",
            provider_data={
                "vm_dir": str(vm_dir),
                "snap_dir": str(snap_dir),
                "files": files,
                "stamps": stamps,
            },
        )

    def remove_snapshot(self, snap: Snapshot) -> None:
        shutil.rmtree(snap.provider_data.get("snap_dir", ""), ignore_errors=True)

    def verify_snapshot(self, snap: Snapshot) -> None:
        for name, stamp in snap.provider_data.get("stamps", {}).items():
            path = Path(snap.provider_data["files"][name])
            try:
                now = _stamp(path)
            except OSError:
                now = None
            if now != stamp:
                raise SnapshotError(
                    f"disk {name!r} of VM {snap.vm.name!r} changed while it was exported "
                    "(the VM must stay stopped on filesystems without reflink): export discarded"
                )

    # -- data -----------------------------------------------------------------------------------
    def open_disk(self, snap: Snapshot, disk: DiskInfo) -> DiskImage:
        try:
            path = snap.provider_data["files"][disk.name]
        except KeyError:
            raise SnapshotError(f"snapshot {snap.id} has no disk {disk.name!r}") from None
        try:
            return open_image(path, disk.format)
        except FormatError:
            raise
        except OSError as exc:
            raise DiskReadError(f"{path}: {exc.strerror}") from None

    def _cbt_dir(self, snap: Snapshot, disk: DiskInfo) -> Path:
        return Path(snap.provider_data["vm_dir"]) / STATE_DIR / "cbt" / disk.name

    def _map_path(self, snap: Snapshot, disk: DiskInfo, change_id: str) -> Path:
        return self._cbt_dir(snap, disk) / f"{change_id}.bmap"

    def _save_map(self, snap: Snapshot, disk: DiskInfo, bmap: BlockMap, keep: set) -> None:
        path = self._map_path(snap, disk, snap.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        bmap.save(path)
        self._prune(path.parent, keep=keep | {snap.id})

    def _scan_map(self, snap: Snapshot, disk: DiskInfo) -> BlockMap:
        image = self.open_disk(snap, disk)
        try:
            block = block_size_for(image.size)
            return BlockMap.scan(image, image.extents(), block, progress=self.progress)
        finally:
            image.close()

    def _full(self, snap: Snapshot, disk: DiskInfo, note: str = "") -> DiskChanges:
        """All data, found by probing (a few MiB read): the export's reads then record the
        snapshot's block map through ``change_tracker``, so a full export reads the disk once."""
        image = self.open_disk(snap, disk)
        try:
            # at the map's block size, so the export's reads cover whole blocks of the map
            block = block_size_for(image.size)
            extents = scan_data_extents(image, None, block, probe=True)
        finally:
            image.close()
        return DiskChanges(extents, snap.id, None, note=note)

    def changed_extents(self, snap: Snapshot, disk: DiskInfo, since: str | None) -> DiskChanges:
        if since is None:
            return self._full(snap, disk)
        old_path = self._map_path(snap, disk, since)
        try:
            old_map = BlockMap.load(old_path)
        except (FileNotFoundError, FormatError) as exc:
            reason = "no longer kept" if isinstance(exc, FileNotFoundError) else "unreadable"
            return self._full(snap, disk, f"change id {since} is {reason}: full export instead")
        new_map = self._scan_map(snap, disk)
        self._save_map(snap, disk, new_map, keep={since})
        if old_map.block_size != new_map.block_size:  # the disk grew past a map-size step
            note = "block size changed: full export instead"
            return DiskChanges(new_map.data_extents(), snap.id, None, note=note)
        return DiskChanges(new_map.diff(old_map), snap.id, since)

    def change_tracker(
        self, snap: Snapshot, disk: DiskInfo, changes: DiskChanges
    ) -> _MapTracker | None:
        if changes.incremental or self._map_path(snap, disk, snap.id).exists():
            return None  # an incremental run scanned and saved the map already
        size = changes.extents.size
        builder = BlockMapBuilder(size, changes.extents, block_size_for(size))
        return _MapTracker(self, snap, disk, builder)

    @staticmethod
    def _prune(cbt_dir: Path, keep: set) -> None:
        maps = sorted(cbt_dir.glob("*.bmap"))
        for old in maps[:-KEEP_MAPS]:
            if old.stem not in keep:
                old.unlink(missing_ok=True)


SOURCE = LocalSource


def create_vm(
    root: str | os.PathLike,
    name: str,
    disk_sizes: dict[str, int],
    cpus: int = 2,
    memory_mib: int = 2048,
) -> Path:
    """Create an empty VM directory with sparse raw disks (used by the demo and tests)."""
    vm_dir = Path(root) / name
    vm_dir.mkdir(parents=True, exist_ok=True)
    disks = []
    for disk_name, size in disk_sizes.items():
        path = vm_dir / f"{disk_name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        disks.append(
            DiskInfo(
                name=disk_name, capacity=size, backing=path.name, format="raw", controller="scsi0"
            )
        )
    vm = VMInfo(
        name=name,
        id=name,
        cpus=cpus,
        memory_mib=memory_mib,
        firmware="bios",
        guest_os="debian12_64Guest",
        power_state="poweredOff",
        disks=disks,
        nics=[
            {
                "name": "nic0",
                "network": "VM Network",
                "mac": "52:54:00:12:34:56",
                "adapter": "vmxnet3",
            }
        ],
    )
    save_vm(vm_dir, vm)
    return vm_dir


__all__ = ["LocalSource", "SOURCE", "create_vm", "load_vm", "FileRangeReader"]


class _MapTracker:
    """The local source's ChangeTracker: builds the snapshot's block map from the export's reads
    and saves it on commit; if the reads did not cover the data, it scans the snapshot instead,
    so a saved map is always exact."""

    def __init__(self, source: LocalSource, snap: Snapshot, disk: DiskInfo, builder):
        self._source, self._snap, self._disk, self._builder = source, snap, disk, builder

    def observe(self, offset: int, data: bytes | memoryview) -> None:
        self._builder.observe(offset, data)

    def commit(self) -> None:
        bmap = self._builder.result() or self._source._scan_map(self._snap, self._disk)
        self._source._save_map(self._snap, self._disk, bmap, keep=set())
