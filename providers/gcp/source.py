"""GCP source (``gcp://PROJECT/ZONE?export_bucket=BUCKET``): Compute Engine instances.

Persistent disks have no changed-block API. A run snapshots every disk of the instance, makes an
image of each snapshot and exports it to the export bucket through the documented image export
(providers.gcp.export), then streams the exported ``disk.raw`` from GCS into the pipeline
(providers.gcp.stream): nothing is staged on a worker's disk. Change tracking is ours, a block-hash
map (hypersdk.blockmap) per exported point kept in the bucket (providers.gcp.maps):
``changed_extents`` reads the whole exported image once to hash it (and diff it against the
previous point's map), then the export reads it again for the planned extents. So every run
reads the whole image twice, while an incremental stores only the blocks whose hash changed; the
run's note says so. See docs/gcp.md.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from urllib.parse import unquote, urlsplit

import numpy as np

from hypersdk.blockmap import BlockMap, block_size_for, hash_blocks
from hypersdk.errors import (
    InvalidParameterError,
    SnapshotError,
    SourceError,
    VMNotFoundError,
)
from hypersdk.extents import ExtentMap
from hypersdk.io import IO_CHUNK
from hypersdk.models import DiskInfo, Snapshot, SnapshotDisk, VMInfo
from hypersdk.names import is_export_id
from hypersdk.references import printable
from providers.base import DiskChanges, Progress, Source
from providers.gcp.connection import Clients, GcpOptions, api_errors
from providers.gcp.export import Exporter, RunPlan, run_export
from providers.gcp.fetch import RangedStream
from providers.gcp.inventory import GiB, last, vm_info
from providers.gcp.maps import load_map, map_key, prune_maps, save_map
from providers.gcp.stream import TarGzDiskReader

NO_CBT = "GCP has no changed-block API: the whole exported image was read and hashed"


class GcpSource(Source):
    schemes = ("gcp",)

    def __init__(self, opts: GcpOptions):
        self.opts = opts
        self.clients = Clients(opts)
        self.exporter = Exporter(self.clients)

    @classmethod
    def from_url(cls, url: str, **options) -> GcpSource:
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise InvalidParameterError("gcp source URL must not carry credentials")
        zone = unquote(parts.path).strip("/")
        return cls(GcpOptions.parse(unquote(parts.hostname or ""), zone, options))

    @property
    def url(self) -> str:
        o = self.opts
        query = f"?export_bucket={o.export_bucket}" if o.export_bucket else ""
        return f"gcp://{o.project}/{o.zone}{query}"

    def _where(self) -> str:
        return f"project {self.opts.project!r}, zone {self.opts.zone!r}"

    # -- inventory ------------------------------------------------------------------------------
    def _project_missing(self, exc: SourceError) -> bool:
        return f"projects/{self.opts.project}'" in str(exc) and "instances/" not in str(exc)

    def _instances(self) -> list:
        try:
            with api_errors(f"GCP {self._where()}", self.opts.compute_endpoint):
                return list(
                    self.clients.compute("instances").list(
                        project=self.opts.project, zone=self.opts.zone
                    )
                )
        except SourceError as exc:
            raise SourceError(f"{exc} (is the project id right, and the zone?)") from None

    def _instance(self, name: str):
        what = f"VM {printable(name)[:80]!r} in {self._where()}"
        if not name or len(name) > 63:
            raise VMNotFoundError(f"{what}: not found")
        try:
            with api_errors(what, self.opts.compute_endpoint, VMNotFoundError):
                return self.clients.compute("instances").get(
                    project=self.opts.project, zone=self.opts.zone, instance=name
                )
        except VMNotFoundError as exc:
            if self._project_missing(exc):
                raise SourceError(f"GCP project {self.opts.project!r} not found") from None
            raise

    def _describe(self, instance, machine_types: dict) -> VMInfo:
        mt_url = instance.machine_type
        if mt_url not in machine_types:
            with api_errors(f"machine type {last(mt_url)}", self.opts.compute_endpoint):
                machine_types[mt_url] = self.clients.compute("machine_types").get(
                    project=self.opts.project, zone=self.opts.zone, machine_type=last(mt_url)
                )
        sizes = {}
        for attached in instance.disks:
            with api_errors(f"disk {last(attached.source)}", self.opts.compute_endpoint):
                disk = self.clients.compute("disks").get(
                    project=self.opts.project, zone=self.opts.zone, disk=last(attached.source)
                )
            sizes[attached.source] = int(disk.size_gb) * GiB
        return vm_info(instance, machine_types[mt_url], sizes)

    def list_vms(self) -> list[VMInfo]:
        cache: dict = {}
        return [self._describe(i, cache) for i in self._instances()]

    def get_vm(self, name: str) -> VMInfo:
        return self._describe(self._instance(name), {})

    def preflight(self, vm: VMInfo) -> None:
        if not self.opts.export_bucket:
            self.clients.bucket()  # the one-line error saying it is needed
        bucket = self.opts.export_bucket
        with api_errors(f"export bucket gs://{bucket}", self.opts.storage_endpoint):
            if not self.clients.bucket().exists():
                raise SourceError(f"export bucket gs://{bucket} does not exist")

    # -- snapshots ------------------------------------------------------------------------------
    def create_snapshot(self, vm: str) -> Snapshot:
        instance = self._instance(vm)
        info = self._describe(instance, {})
        snap_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        plan = RunPlan(str(instance.id), snap_id, [a.source for a in instance.disks])
        self.exporter.sweep(plan.instance_id, self.opts.stale_after)  # what killed runs left
        self.exporter.write_marker(plan)
        try:
            run_export(self.exporter, plan)
            objects = {}
            for i, disk in enumerate(info.disks):
                key = plan.object_key(self.opts.export_prefix, i)
                blob = self._blob_meta(key)
                with self._reader(key, blob.generation, blob.size, disk.capacity) as reader:
                    size = reader.size  # the image's own size (its tar header says)
                objects[disk.name] = {"key": key, "generation": blob.generation, "size": blob.size}
                disk.capacity = size
        except BaseException:
            with contextlib.suppress(Exception):
                self.exporter.release(self._marker(plan))
            raise
        return Snapshot(
            id=snap_id,
            vm=info,
            disks=[SnapshotDisk(disk=d, change_id=snap_id) for d in info.disks],
            consistency="crash-consistent",
            provider_data={
                "instance_id": plan.instance_id,
                "disks": plan.disks,
                "created": plan.created,
                "builds": plan.builds,
                "objects": objects,
            },
        )

    def _marker(self, plan: RunPlan) -> dict:
        import json

        return json.loads(plan.to_json(self.opts.export_prefix))

    def remove_snapshot(self, snap: Snapshot) -> None:
        data = snap.provider_data
        if not is_export_id(snap.id) or not data.get("instance_id"):
            return
        plan = RunPlan(str(data["instance_id"]), snap.id, list(data.get("disks", [])))
        plan.created = float(data.get("created", 0))
        plan.builds = list(data.get("builds", []))
        self.exporter.release(self._marker(plan))

    def cleanup(self, vm: str | None = None, older_than: float = 0.0) -> list[str]:
        """Remove what killed runs left (of ``vm``, or of every instance): snapshots, images,
        exported objects named by run markers older than ``older_than`` seconds. Only for when
        no export of those VMs is running (a running one's marker is as old as it is)."""
        instance_id = str(self._instance(vm).id) if vm else None
        return self.exporter.sweep(instance_id, older_than)

    # -- data -----------------------------------------------------------------------------------
    def _blob_meta(self, key: str):
        bucket = self.clients.bucket()
        with api_errors(f"gs://{bucket.name}/{key}", self.opts.storage_endpoint, SnapshotError):
            blob = bucket.get_blob(key)
        if blob is None:
            raise SnapshotError(f"gs://{bucket.name}/{key}: the image export wrote nothing")
        return blob

    def _reader(
        self, key: str, generation: int, size: int, capacity: int, progress=None
    ) -> TarGzDiskReader:
        bucket = self.clients.bucket()
        blob = bucket.blob(key, generation=generation)

        def opener():
            return RangedStream(blob, size, self.opts.chunk_size)

        return TarGzDiskReader(opener, f"gs://{bucket.name}/{key}", capacity, progress)

    def open_disk(
        self,
        snap: Snapshot,
        disk: DiskInfo,
        planned: ExtentMap | None = None,
        progress: Progress | None = None,
    ) -> TarGzDiskReader:
        try:
            obj = snap.provider_data["objects"][disk.name]
        except KeyError:
            raise SnapshotError(f"snapshot {snap.id} has no disk {disk.name!r}") from None
        reader = self._reader(obj["key"], obj["generation"], obj["size"], disk.capacity, progress)
        if reader.size != disk.capacity:
            reader.close()
            raise SnapshotError(f"{reader.name}: image size changed since the snapshot")
        return reader

    def _scan(self, snap: Snapshot, disk: DiskInfo, progress: Progress | None) -> BlockMap:
        """One streamed pass over the exported image, hashing every block: a chunk is hashed on
        a helper thread while the next one is fetched and decompressed (zlib lets go of the
        GIL), so the pass costs about the slower of the two."""
        from concurrent.futures import ThreadPoolExecutor

        reader = self.open_disk(snap, disk)
        try:
            size = reader.size
            block = block_size_for(size)
            hashes = np.zeros(-(-size // block), dtype=np.uint64)
            step = max(block, IO_CHUNK // block * block)

            def hash_chunk(offset: int, data: bytes) -> None:
                hash_blocks(hashes, offset // block, data, block)
                if progress:
                    progress(len(data))

            with ThreadPoolExecutor(1, thread_name_prefix="gcp-hash") as pool:
                pending = None
                for offset in range(0, size, step):
                    data = reader.read(offset, min(step, size - offset))
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(hash_chunk, offset, data)
                if pending is not None:
                    pending.result()
            return BlockMap(size, block, hashes)
        finally:
            reader.close()

    def changed_extents(
        self, snap: Snapshot, disk: DiskInfo, since: str | None, progress: Progress | None = None
    ) -> DiskChanges:
        bucket = self.clients.bucket()
        prefix, inst = self.opts.export_prefix, str(snap.provider_data["instance_id"])
        old, why = None, ""
        if since is not None:
            if not is_export_id(since):
                why = f"change id {printable(since)[:80]!r} is malformed: full export"
            else:
                with api_errors("block map", self.opts.storage_endpoint):
                    old = load_map(bucket, map_key(prefix, inst, disk.name, since))
                why = "" if old else f"block map of change id {since} is no longer kept: full"
        new = self._scan(snap, disk, progress)
        with api_errors("block map", self.opts.storage_endpoint):
            save_map(bucket, map_key(prefix, inst, disk.name, snap.id), new)
            prune_maps(
                bucket, prefix, inst, disk.name, keep={snap.id} | ({since} if since else set())
            )
        if old is not None and old.block_size == new.block_size and old.size <= new.size:
            note = f"{NO_CBT}; only blocks whose hash changed since {since} are stored"
            return DiskChanges(new.diff(old), snap.id, since, note=note)
        if old is not None:
            why = "disk size or block size changed: full export"
        note = "; ".join(
            n for n in (why, f"{NO_CBT} (its block map is kept for incrementals)") if n
        )
        return DiskChanges(new.data_extents(), snap.id, None, note=note)

    def close(self) -> None:
        self.clients.close()


__all__ = ["GcpSource"]
