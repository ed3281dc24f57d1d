"""Snapshot -> image -> image export to GCS, and removal of everything a run made.

The Compute API has no call that exports a disk's bytes. ``gcloud compute images export`` (the
documented way, docs/gcp.md) submits a Cloud Build build whose one step is compute-image-import's
``gce_vm_image_export`` builder: it runs a Daisy workflow that boots a temporary worker VM with
the image attached as a disk and writes it to the destination as the Compute Engine image format
(``disk.raw`` in a tar.gz). We submit the same build through the Cloud Build REST API
(``projects.builds.create``) and poll ``projects.builds.get``.

Every resource of a run is named up front from its snapshot id (snapshots and images
``hsdk-<id>-<n>``, objects ``<prefix>/<instance>/<id>/<n>.tar.gz``) and listed in a run marker
object, ``<prefix>/runs/<instance>/<id>.json``, written *before* any of them is created. The
temporary image and snapshot are deleted as soon as the export object exists; the object and the
marker when the run releases its snapshot (success or failure). A run killed on the way leaves
its marker: the next export of the same instance removes every resource a marker older than
``stale_after`` names (``sweep``), and ``GcpSource.cleanup`` does so on demand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from hypersdk.errors import SnapshotError, SourceError
from hypersdk.names import is_export_id
from providers.gcp.connection import Clients, api_errors, wait_operation

log = logging.getLogger(__name__)

_BUILD_DONE = {"SUCCESS"}
_BUILD_FAILED = {"FAILURE", "INTERNAL_ERROR", "TIMEOUT", "CANCELLED", "EXPIRED"}
MAX_MARKER = 256 * 1024


@dataclass
class RunPlan:
    """What one run creates, named before it creates anything."""

    instance_id: str
    snap_id: str
    disks: list[str]  # source disk URLs, in the VM's disk order
    created: float = field(default_factory=time.time)
    builds: list[str] = field(default_factory=list)

    def resource(self, i: int) -> str:
        return f"hsdk-{self.snap_id.lower()}-{i}"

    def object_key(self, prefix: str, i: int) -> str:
        return f"{prefix}/{self.instance_id}/{self.snap_id}/{i}.tar.gz"

    def to_json(self, prefix: str) -> bytes:
        n = range(len(self.disks))
        return json.dumps(
            {
                "instance_id": self.instance_id,
                "snap_id": self.snap_id,
                "created": self.created,
                "snapshots": [self.resource(i) for i in n],
                "images": [self.resource(i) for i in n],
                "objects": [self.object_key(prefix, i) for i in n],
                "builds": self.builds,
            }
        ).encode()


def marker_key(prefix: str, instance_id: str, snap_id: str) -> str:
    return f"{prefix}/runs/{instance_id}/{snap_id}.json"


class Exporter:
    """Runs the steps of one export of an instance's disks, through ``clients``."""

    def __init__(self, clients: Clients):
        self.c = clients
        self.o = clients.opts

    # -- run markers --------------------------------------------------------------------------
    def write_marker(self, plan: RunPlan) -> None:
        bucket = self.c.bucket()
        key = marker_key(self.o.export_prefix, plan.instance_id, plan.snap_id)
        with api_errors(f"gs://{bucket.name}/{key}", self.o.storage_endpoint):
            bucket.blob(key).upload_from_string(
                plan.to_json(self.o.export_prefix), content_type="application/json"
            )

    # -- steps --------------------------------------------------------------------------------
    def _global(self, kind: str, body: Any, what: str) -> None:
        client = self.c.compute(kind)
        with api_errors(what, self.o.compute_endpoint, SnapshotError):
            if kind == "snapshots":
                op = client.insert_unary(project=self.o.project, snapshot_resource=body)
            else:
                op = client.insert_unary(project=self.o.project, image_resource=body)
            wait_operation(self.c, op, what, self.o.export_timeout)

    def snapshot(self, plan: RunPlan, i: int) -> None:
        from google.cloud import compute_v1

        body = compute_v1.Snapshot(
            name=plan.resource(i),
            source_disk=plan.disks[i],
            labels={"hypersdk": "export", "hypersdk-instance": plan.instance_id},
        )
        self._global("snapshots", body, f"snapshot {plan.resource(i)} of {plan.disks[i]}")

    def image(self, plan: RunPlan, i: int) -> None:
        from google.cloud import compute_v1

        source = f"projects/{self.o.project}/global/snapshots/{plan.resource(i)}"
        body = compute_v1.Image(
            name=plan.resource(i),
            source_snapshot=source,
            labels={"hypersdk": "export", "hypersdk-instance": plan.instance_id},
        )
        self._global("images", body, f"image {plan.resource(i)}")

    def _cloudbuild(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.o.cloudbuild_endpoint}/v1/projects/{self.o.project}/{path}"
        what = f"Cloud Build {path.split('/')[0]}"
        with api_errors(what, self.o.cloudbuild_endpoint, SnapshotError):
            resp = self.c.session.request(method, url, json=body, timeout=(10, 60))
        if resp.status_code in (401, 403):
            from hypersdk.errors import CredentialsError

            raise CredentialsError(f"{what}: credentials rejected (HTTP {resp.status_code})")
        if resp.status_code >= 300:
            raise SnapshotError(f"{what}: HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return resp.json()
        except ValueError:
            raise SnapshotError(f"{what}: answer is not JSON") from None

    def start_export(self, plan: RunPlan, i: int) -> str:
        """Submit the image export build (what ``gcloud compute images export`` submits)."""
        bucket = self.o.export_bucket
        timeout = int(self.o.export_timeout)
        body = {
            "steps": [
                {
                    "name": self.o.export_builder,
                    "args": [
                        f"-timeout={max(60, timeout - 200)}s",
                        f"-source_image=projects/{self.o.project}/global/images/{plan.resource(i)}",
                        "-client_id=api",
                        f"-destination_uri=gs://{bucket}/{plan.object_key(self.o.export_prefix, i)}",
                        f"-zone={self.o.zone}",
                    ],
                }
            ],
            "timeout": f"{timeout}s",
            "tags": ["gce-daisy", "gce-daisy-image-export", "hypersdk"],
        }
        answer = self._cloudbuild("POST", "builds", body)
        build = (answer.get("metadata") or {}).get("build") or {}
        build_id = build.get("id")
        if not isinstance(build_id, str) or not build_id:
            raise SnapshotError("Cloud Build: the export build has no id in the answer")
        return build_id

    def wait_export(self, build_id: str) -> None:
        deadline = time.monotonic() + self.o.export_timeout
        while True:
            build = self._cloudbuild("GET", f"builds/{build_id}")
            status = build.get("status")
            if status in _BUILD_DONE:
                return
            if status in _BUILD_FAILED:
                detail = str(build.get("statusDetail") or "")[:200]
                raise SnapshotError(f"image export build {build_id} ended {status} {detail}")
            if time.monotonic() > deadline:
                raise SnapshotError(f"image export build {build_id}: not done in time")
            time.sleep(self.o.poll_seconds)

    # -- removal ------------------------------------------------------------------------------
    def remove(self, marker: dict) -> list[str]:
        """Delete what a marker names (each may be gone already); what could not be removed."""
        from google.api_core import exceptions as gexc

        left: list[str] = []
        ours = {f"-destination_uri=gs://{self.o.export_bucket}/{key}" for key in marker["objects"]}
        for build_id in marker.get("builds", []):
            with contextlib.suppress(Exception):  # gone, or finished (refuses): that is fine
                build = self._cloudbuild("GET", f"builds/{build_id}")
                args = {a for step in build.get("steps", []) for a in step.get("args", [])}
                if "hypersdk" in build.get("tags", []) and args & ours:  # only our exports
                    self._cloudbuild("POST", f"builds/{build_id}:cancel", {})
        for kind, names in (("images", marker["images"]), ("snapshots", marker["snapshots"])):
            client = self.c.compute(kind)
            for name in names:
                try:
                    if kind == "images":
                        op = client.delete_unary(project=self.o.project, image=name)
                    else:
                        op = client.delete_unary(project=self.o.project, snapshot=name)
                    wait_operation(self.c, op, f"deleting {kind[:-1]} {name}", 600)
                except gexc.NotFound:
                    pass
                except Exception as exc:  # noqa: BLE001 - report and go on with the rest
                    log.warning("could not delete %s %s: %s", kind[:-1], name, exc)
                    left.append(f"{kind[:-1]} {name}")
        bucket = self.c.bucket()
        for key in marker["objects"]:
            try:
                bucket.delete_blob(key)
            except gexc.NotFound:
                pass
            except Exception as exc:  # noqa: BLE001
                log.warning("could not delete gs://%s/%s: %s", bucket.name, key, exc)
                left.append(f"gs://{bucket.name}/{key}")
        return left

    def release(self, marker: dict) -> None:
        """Remove a run's resources, then its marker (kept if anything is left)."""
        left = self.remove(marker)
        if left:
            raise SnapshotError(f"could not remove {', '.join(left[:4])}: removed next run")
        key = marker_key(self.o.export_prefix, marker["instance_id"], marker["snap_id"])
        with contextlib.suppress(Exception):
            self.c.bucket().delete_blob(key)

    def sweep(self, instance_id: str | None, older_than: float) -> list[str]:
        """Release every run marker (of ``instance_id``, or all) older than ``older_than``
        seconds: what killed runs left. Returns the snapshot ids released."""
        bucket = self.c.bucket()
        prefix = f"{self.o.export_prefix}/runs/" + (f"{instance_id}/" if instance_id else "")
        now = time.time()
        done = []
        with api_errors(f"gs://{bucket.name}/{prefix}", self.o.storage_endpoint):
            blobs = list(self.c.storage.list_blobs(bucket, prefix=prefix))
        for blob in blobs:
            marker = self._read_marker(blob)
            if marker is None or now - marker["created"] < older_than:
                continue
            log.info("removing what run %s left (snapshot, image, export)", marker["snap_id"])
            self.release(marker)
            done.append(marker["snap_id"])
        return done

    def _read_marker(self, blob: Any) -> dict | None:
        """A marker's content, or None for anything that is not one of ours (left alone).

        The bucket is shared with whoever can write to it, so a marker only ever names what a
        run of ours would have made under its own key: the snapshot, image and object names are
        recomputed from its instance and snapshot id and must match exactly (a planted marker
        cannot get another object or image deleted)."""
        if (blob.size or 0) > MAX_MARKER:
            return None
        try:
            marker = json.loads(blob.download_as_bytes())
        except Exception:  # noqa: BLE001 - unreadable: not ours to act on
            return None
        keys = ("instance_id", "snap_id", "created", "snapshots", "images", "objects", "builds")
        if not isinstance(marker, dict) or any(k not in marker for k in keys):
            return None
        inst, snap_id = marker["instance_id"], marker["snap_id"]
        if not (isinstance(inst, str) and inst.isdigit() and is_export_id(snap_id)):
            return None
        if blob.name != marker_key(self.o.export_prefix, inst, snap_id):
            return None
        if not isinstance(marker["created"], int | float) or not isinstance(marker["images"], list):
            return None
        plan = RunPlan(inst, snap_id, [""] * len(marker["images"]))
        expected = json.loads(plan.to_json(self.o.export_prefix))
        if any(marker[k] != expected[k] for k in ("snapshots", "images", "objects")):
            return None
        builds = marker["builds"]
        if not isinstance(builds, list) or not all(
            isinstance(b, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", b) for b in builds
        ):
            return None
        return marker


def run_export(exporter: Exporter, plan: RunPlan) -> None:
    """Snapshots of every disk first (closest to one point in time), then an image of each,
    then the exports (all builds at once); the image and snapshot go once their export is
    written. On any failure the caller releases the marker."""
    for i in range(len(plan.disks)):
        exporter.snapshot(plan, i)
    for i in range(len(plan.disks)):
        exporter.image(plan, i)
    for i in range(len(plan.disks)):
        plan.builds.append(exporter.start_export(plan, i))
        exporter.write_marker(plan)  # a killed run's builds are cancelled by the sweep
    for build_id in plan.builds:
        exporter.wait_export(build_id)
    partial = json.loads(plan.to_json(exporter.o.export_prefix))
    partial["objects"] = []  # the exports are the snapshot now: only image and snapshot go
    partial["builds"] = []
    left = exporter.remove(partial)
    if left:
        raise SourceError(f"could not remove {', '.join(left[:4])}")


__all__ = ["Exporter", "RunPlan", "marker_key", "run_export"]
