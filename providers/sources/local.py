"""The local provider: a VM is a directory holding ``vm.json`` and its disk images.

``vm.json`` is a VMInfo (name, cpus, memory, firmware, disks, nics) whose disks name image files
relative to the VM directory (``backing``). A source URL points at a directory of such VMs
(``local:///var/lib/vms``) or at one VM directory.

A VM directory is untrusted input. ``vm.json`` is read with a size bound and any problem with it
is one SourceError line. A disk must be a regular file inside the VM directory once symlinks are
resolved (hypersdk.references), and so must every file its image refers to (backing files,
extents); ``local:///vms?allow_outside=true`` is the explicit opt-in for disks elsewhere. A disk
without a declared ``format`` is exported only if it probes as raw: a guest writes what it likes
into a raw disk, a qcow2 header with a backing file name included, so a header alone never
decides that a disk is a container. Names from ``vm.json`` become paths only once encoded
(hypersdk.names), and the state kept under ``.hypersdk`` never goes through a symlink.

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
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pydantic_core
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
from hypersdk.extents import ExtentMap
from hypersdk.formats import open_image, probe
from hypersdk.formats.base import DiskImage
from hypersdk.io import FileRangeReader
from hypersdk.models import DiskInfo, Snapshot, SnapshotDisk, VMInfo
from hypersdk.names import is_export_id, safe_component
from hypersdk.references import ReferencePolicy, printable, require_regular, resolve_reference
from hypersdk.smallfile import UnreadableFile, read_small_file
from providers.base import DiskChanges, Progress, Source

DESCRIPTION = "vm.json"
MAX_DESCRIPTION = 1024 * 1024  # a VM description is a few KiB; more is not one
STATE_DIR = ".hypersdk"
KEEP_MAPS = 8  # change maps kept per disk: older change ids fall back to a full export
FICLONE = 0x40049409
_TRUE = {"1", "true", "yes", "on"}
_RESOLVE_ONLY = ReferencePolicy(allow_outside=True)  # LocalSource._check_inside decides
log = logging.getLogger(__name__)


def _read_description(vm_dir: Path) -> bytes:
    """vm.json's bytes: a regular file of at most MAX_DESCRIPTION bytes (a FIFO or a device
    would hang or never end)."""
    path = vm_dir / DESCRIPTION
    try:
        return read_small_file(path, MAX_DESCRIPTION)
    except FileNotFoundError:
        raise VMNotFoundError(f"{vm_dir}: no {DESCRIPTION} (not a VM directory)") from None
    except UnreadableFile as exc:
        raise SourceError(f"{path}: VM description refused: {exc}") from None


def load_vm(vm_dir: Path) -> VMInfo:
    path = vm_dir / DESCRIPTION
    data = _read_description(vm_dir)
    try:
        raw = pydantic_core.from_json(data)  # iterative: deep nesting is an error, no recursion
    except ValueError as exc:
        raise SourceError(f"{path}: VM description is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: VM description must be a JSON object")
    raw.setdefault("id", vm_dir.name)
    try:
        vm = VMInfo.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = printable(".".join(str(p) for p in first["loc"]))
        msg = printable(first["msg"])
        raise SourceError(f"{path}: invalid VM description at {where}: {msg}") from None
    names = [d.name for d in vm.disks]
    for name in names:
        if not name or names.count(name) > 1:
            problem = "is empty" if not name else "is not unique"
            raise SourceError(f"{path}: disk name {printable(name)!r} {problem}")
    return vm


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

    def __init__(self, root: str | os.PathLike, allow_outside: bool = False):
        self.root = Path(root).expanduser().absolute()
        self.allow_outside = allow_outside

    @classmethod
    def from_url(cls, url: str, **options) -> LocalSource:
        allow = options.pop("allow_outside", False)
        if options:
            raise InvalidParameterError(
                f"local source takes only the allow_outside option (got {', '.join(options)})"
            )
        if isinstance(allow, str):
            allow = allow.strip().lower() in _TRUE
        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path) if parts.scheme == "local" else url
        if not path:
            raise InvalidParameterError(f"local source URL has no path: {url!r}")
        return cls(path, allow_outside=bool(allow))

    @property
    def url(self) -> str:
        return f"local://{self.root}" + ("?allow_outside=true" if self.allow_outside else "")

    def _policy(self, vm_dir: Path) -> ReferencePolicy:
        """Images of the VM may refer to any file of its directory (a disk in ``disks/`` to a
        base image next to vm.json), and anywhere only when the user opted in."""
        return ReferencePolicy(
            allow_outside=self.allow_outside, roots=(str(vm_dir),), repository_chains=False
        )

    def _check_inside(self, vm_dir: Path, path: str, what: str) -> None:
        """``path`` (already resolved) lies in the VM directory, or the user allowed outside."""
        home = os.path.realpath(vm_dir)
        if self.allow_outside or path == home or path.startswith(home.rstrip(os.sep) + os.sep):
            return
        raise FormatError(
            str(vm_dir / DESCRIPTION),
            f"{what} resolves to {printable(path)}, outside the VM directory {printable(home)}: "
            "refused (add ?allow_outside=true to the local:// source URL if you trust it)",
        )

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
        """The disk's image file: resolved, inside the VM directory (unless allowed outside),
        a regular file (never a FIFO or a device)."""
        rel = disk.backing or f"{disk.name}.img"
        what = f"disk {printable(disk.name)!r}"
        # resolve_reference checks the name and resolves it; _check_inside decides, against
        # the VM directory itself (vm.json may be a symlink: its target's directory is not ours)
        path = resolve_reference(str(vm_dir / DESCRIPTION), rel, what, _RESOLVE_ONLY)
        self._check_inside(vm_dir, path, f"{what} ({printable(rel)!r})")
        if not os.path.lexists(path):
            raise DiskReadError(f"{what} of VM {printable(vm_dir.name)!r}: {path} does not exist")
        require_regular(path, f"{what} of VM {printable(vm_dir.name)!r}")
        if not os.access(path, os.R_OK):
            raise DiskReadError(f"{what} of VM {printable(vm_dir.name)!r}: {path} is not readable")
        return Path(path)

    def preflight(self, vm: VMInfo) -> None:
        """Every disk file exists, is readable and lies where it may; a stopped VM or one on a
        filesystem with reflink clones (the snapshot's own check happens at snapshot time)."""
        vm_dir = self.vm_dir(vm.name)
        for disk in vm.disks:
            self._disk_path(vm_dir, disk)

    @staticmethod
    def _state_dir(vm_dir: Path, *parts: str) -> Path:
        """``<vm>/.hypersdk/<parts>``, created; SourceError if any of it is a symlink or not a
        directory (state written through a link would land, or be pruned, elsewhere)."""
        path = vm_dir / STATE_DIR
        for step in (path, *(path.joinpath(*parts[: i + 1]) for i in range(len(parts)))):
            try:
                step.mkdir(exist_ok=True)
            except OSError as exc:
                raise SourceError(
                    f"{step}: cannot create state directory: {exc.strerror}"
                ) from None
            if not stat.S_ISDIR(os.lstat(step).st_mode):
                raise SourceError(f"{step}: state directory is a symlink or not a directory")
        return path.joinpath(*parts)

    # -- snapshots ------------------------------------------------------------------------------
    def create_snapshot(self, vm: str) -> Snapshot:
        vm_dir = self.vm_dir(vm)
        info = load_vm(vm_dir)
        snap_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        snaps = self._state_dir(vm_dir, "snapshots")
        _sweep_dead_snapshots(snaps)
        snap_dir = snaps / snap_id
        snap_dir.mkdir(exist_ok=False)
        _hold(snap_dir)
        disks, files, stamps = [], {}, {}
        cloned = True
        try:
            for i, disk in enumerate(info.disks):
                live = self._disk_path(vm_dir, disk)
                clone = snap_dir / f"{i}-{live.name}"  # two disks may share a file name
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
            _release(snap_dir)
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
        snap_dir = snap.provider_data.get("snap_dir", "")
        vm_dir = snap.provider_data.get("vm_dir", "")
        if snap_dir and vm_dir and Path(snap_dir).parent == Path(vm_dir) / STATE_DIR / "snapshots":
            shutil.rmtree(snap_dir, ignore_errors=True)  # only a snapshot directory of ours
            _release(Path(snap_dir))

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
    def open_disk(
        self,
        snap: Snapshot,
        disk: DiskInfo,
        planned: ExtentMap | None = None,
        progress: Progress | None = None,
    ) -> DiskImage:
        try:
            path = snap.provider_data["files"][disk.name]
        except KeyError:
            raise SnapshotError(f"snapshot {snap.id} has no disk {disk.name!r}") from None
        vm_dir = Path(snap.provider_data["vm_dir"])
        what = f"disk {printable(disk.name)!r}"
        real = os.path.realpath(path)  # re-checked: the directory may have changed since
        self._check_inside(vm_dir, real, what)
        require_regular(real, what)
        fmt = disk.format or self._probe_raw(real, disk)
        try:
            return open_image(real, fmt, self._policy(vm_dir))
        except FormatError:
            raise
        except OSError as exc:
            raise DiskReadError(f"{path}: {exc.strerror}") from None

    @staticmethod
    def _probe_raw(path: str, disk: DiskInfo) -> str:
        """The format of a disk whose format vm.json leaves out: raw, if its bytes do not look
        like a container. A container-looking one is refused rather than opened: a guest can
        write any header into a raw disk (a qcow2 header naming a backing file on the host)."""
        with FileRangeReader(path) as reader:
            looks = probe(reader).name
        if looks == "raw":
            return "raw"
        raise FormatError(
            path,
            f'disk {printable(disk.name)!r} has no "format" in {DESCRIPTION} and its contents '
            f"look like {looks}: refused, because a guest can write any header into a raw disk. "
            f'Declare "format": "{looks}" (or "raw") for this disk in {DESCRIPTION}',
        )

    def _cbt_dir(self, snap: Snapshot, disk: DiskInfo) -> Path:
        """The disk's change-map directory: one component per disk, whatever its name."""
        vm_dir = Path(snap.provider_data["vm_dir"])
        return self._state_dir(vm_dir, "cbt", safe_component(disk.name, "disk name"))

    def _map_path(self, snap: Snapshot, disk: DiskInfo, change_id: str) -> Path:
        if not is_export_id(change_id):  # ids are ours (snapshot ids): anything else is planted
            raise InvalidParameterError(f"change id {printable(change_id)!r} is malformed")
        return self._cbt_dir(snap, disk) / f"{change_id}.bmap"

    def _save_map(self, snap: Snapshot, disk: DiskInfo, bmap: BlockMap, keep: set) -> None:
        path = self._map_path(snap, disk, snap.id)
        bmap.save(path)  # random O_EXCL temporary name, then a rename: nothing planted is followed
        self._prune(path.parent, keep=keep | {snap.id})

    def _scan_map(
        self, snap: Snapshot, disk: DiskInfo, progress: Progress | None = None
    ) -> BlockMap:
        image = self.open_disk(snap, disk)
        try:
            block = block_size_for(image.size)
            return BlockMap.scan(image, image.extents(), block, progress=progress)
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

    def changed_extents(
        self, snap: Snapshot, disk: DiskInfo, since: str | None, progress: Progress | None = None
    ) -> DiskChanges:
        if since is None:
            return self._full(snap, disk)
        if not is_export_id(since):
            note = f"change id {printable(since)[:80]!r} is malformed: full export instead"
            return self._full(snap, disk, note)
        old_path = self._map_path(snap, disk, since)
        try:
            old_map = BlockMap.load(old_path)  # never follows a link, never waits on a FIFO
        except (FileNotFoundError, FormatError) as exc:
            reason = "no longer kept" if isinstance(exc, FileNotFoundError) else "unreadable"
            return self._full(snap, disk, f"change id {since} is {reason}: full export instead")
        new_map = self._scan_map(snap, disk, progress)
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
        """Drop the oldest maps of this one disk directory (only names of maps we write)."""
        maps = sorted(p for p in cbt_dir.glob("*.bmap") if is_export_id(p.stem))
        for old in maps[:-KEEP_MAPS]:
            if old.stem not in keep:
                with contextlib.suppress(OSError):  # a planted directory stays where it is
                    old.unlink(missing_ok=True)


# -- snapshots of runs that died ----------------------------------------------------------------
# A run killed with SIGKILL (a worker's grace period ran out, a machine lost) cannot remove its
# snapshot directory, and on a reflink filesystem its clones hold space as the VM writes. Each
# live snapshot directory holds an flock on its HOLD file for as long as this process keeps it:
# the kernel drops the lock when the process dies, so the next snapshot of the VM removes every
# directory whose lock it can take. A directory without the file (a run killed between mkdir
# and the lock) is removed once it is an hour old.
HOLD = ".held"
ORPHAN_AGE = 3600.0
_held: dict[str, int] = {}  # snapshot directory -> fd of its lock, for this process's snapshots
_held_lock = threading.Lock()


def _hold(snap_dir: Path) -> None:
    fd = os.open(snap_dir / HOLD, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a new directory: nobody else holds it
    with _held_lock:
        _held[str(snap_dir)] = fd


def _release(snap_dir: Path) -> None:
    with _held_lock:
        fd = _held.pop(str(snap_dir), None)
    if fd is not None:
        os.close(fd)


def _sweep_dead_snapshots(snaps: Path) -> None:
    """Remove the snapshot directories whose run died (their lock is free)."""
    with _held_lock:
        ours = set(_held)
    with contextlib.suppress(OSError), os.scandir(snaps) as entries:
        for entry in entries:
            if entry.path in ours or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(
                    os.path.join(entry.path, HOLD), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                )
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_AGE:
                        shutil.rmtree(entry.path, ignore_errors=True)
                continue
            except OSError:
                continue  # a planted symlink or an unreadable file: not ours to judge
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live run holds it
            else:
                log.info("removing the snapshot %s of a run that died", entry.name)
                shutil.rmtree(entry.path, ignore_errors=True)
            finally:
                os.close(fd)


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
