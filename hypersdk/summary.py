"""The result of a migration/backup run and its human summaries (terminal text, markdown)."""

from __future__ import annotations

from pydantic import BaseModel

from hypersdk.units import human


class DiskResult(BaseModel):
    name: str
    key: str
    location: str
    format: str
    virtual_size: int
    data_bytes: int
    object_size: int
    skipped_bytes: int
    incremental: bool
    base_key: str | None = None
    note: str = ""
    stages: dict[str, dict[str, float]] = {}


class MigrationResult(BaseModel):
    export_id: str
    kind: str
    vm: str
    source: str
    target: str
    manifest: str
    encrypted: bool
    verified: bool
    seconds: float
    disks: list[DiskResult]
    flow_run_id: str | None = None
    ui_url: str | None = None

    @property
    def read_bytes(self) -> int:
        return sum(d.data_bytes for d in self.disks)

    @property
    def written_bytes(self) -> int:
        return sum(d.object_size for d in self.disks)

    @property
    def skipped_bytes(self) -> int:
        return sum(d.skipped_bytes for d in self.disks)

    @property
    def virtual_bytes(self) -> int:
        return sum(d.virtual_size for d in self.disks)

    @property
    def throughput(self) -> float:
        """Guest bytes covered per second (virtual size / wall time), in MB/s."""
        return self.virtual_bytes / self.seconds / 1e6 if self.seconds else 0.0


def _stage_line(d: DiskResult) -> str:
    parts = []
    for name in ("download", "convert", "encrypt", "upload"):
        st = d.stages.get(name)
        if st and st.get("seconds", 0) > 0:
            parts.append(f"{name} {st['bytes'] / st['seconds'] / 1e6:,.0f} MB/s")
    return ", ".join(parts)


def render_text(r: MigrationResult) -> str:
    lines = [
        f"{r.kind.capitalize()} export of VM {r.vm!r} -> {r.target}  (export {r.export_id})",
        f"  read {human(r.read_bytes)}, wrote {human(r.written_bytes)}, skipped {human(r.skipped_bytes)}"
        f" of {human(r.virtual_bytes)} in {r.seconds:.1f} s ({r.throughput:,.0f} MB/s of disk)",
    ]
    for d in r.disks:
        kind = f"delta on {d.base_key}" if d.incremental else "full"
        lines.append(f"  {d.name}: {d.location} ({d.format}, {kind}, {human(d.object_size)})")
        if stages := _stage_line(d):
            lines.append(f"    stages: {stages}")
        if d.note:
            lines.append(f"    note: {d.note}")
    lines.append(f"  manifest: {r.manifest}" + ("  (verified)" if r.verified else ""))
    if r.encrypted:
        lines.append("  encrypted: yes (key never stored)")
    if r.ui_url:
        lines.append(f"  Prefect UI: {r.ui_url}")
    elif r.flow_run_id:  # ran on an ephemeral API: the run is in the database, no UI is up
        lines.append(
            f"  Prefect run {r.flow_run_id} (no Prefect server was running: `hyperctl server "
            "start` serves the UI with this run)"
        )
    return "\n".join(lines)


def render_json(r: MigrationResult) -> dict:
    """The run as one JSON object for scripts (``hyperctl backup|migrate --json``): what was
    exported where, the manifest's key on the target, each disk's sizes, the wall time."""
    from hypersdk.repository import manifest_key

    return {
        "export_id": r.export_id,
        "vm": r.vm,
        "kind": r.kind,
        "source": r.source,
        "target": r.target,
        "manifest_key": manifest_key(r.vm, r.export_id),
        "manifest": r.manifest,
        "encrypted": r.encrypted,
        "verified": r.verified,
        "duration_seconds": round(r.seconds, 3),
        "disks": [
            {
                "name": d.name,
                "kind": "delta" if d.incremental else "full",
                "key": d.key,
                "location": d.location,
                "format": d.format,
                "virtual_size": d.virtual_size,
                "read_bytes": d.data_bytes,
                "stored_bytes": d.object_size,
                "skipped_bytes": d.skipped_bytes,
                "parent_key": d.base_key,
                "note": d.note,
            }
            for d in r.disks
        ],
        "read_bytes": r.read_bytes,
        "stored_bytes": r.written_bytes,
        "flow_run_id": r.flow_run_id,
        "ui_url": r.ui_url,
    }


def render_markdown(r: MigrationResult) -> str:
    rows = "\n".join(
        f"| {d.name} | `{d.location}` | {d.format} | {'delta' if d.incremental else 'full'} | "
        f"{human(d.virtual_size)} | {human(d.data_bytes)} | {human(d.object_size)} | {human(d.skipped_bytes)} |"
        for d in r.disks
    )
    return (
        f"# {r.kind.capitalize()} export of `{r.vm}`\n\n"
        f"Export `{r.export_id}` from `{r.source}` to `{r.target}` in {r.seconds:.1f} s "
        f"({r.throughput:,.0f} MB/s of disk). Manifest: `{r.manifest}`"
        f"{' (verified)' if r.verified else ''}{', encrypted' if r.encrypted else ''}.\n\n"
        "| disk | object | format | kind | virtual | read | written | skipped |\n"
        "|---|---|---|---|---|---|---|---|\n" + rows + "\n"
    )
