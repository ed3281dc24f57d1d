"""``hyperctl backup|migrate --json``: one JSON object on stdout and nothing else (no progress
bars on the terminal either), naming the export, its manifest's key and each disk's sizes; the
text summary names the export id too. Real subprocesses against a real Prefect server, stderr on
a pseudo-terminal where the bars would be drawn."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from hypersdk.imagegen import mutate_disk, write_realistic_disk
from providers.sources.local import create_vm

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
MiB = 1024 * 1024
SIZE = 8 * MiB + 512


def _run(env: dict, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """hyperctl with stdout on a pipe and stderr on a pseudo-terminal: (result, terminal)."""
    main, child = pty.openpty()
    try:
        res = subprocess.run(
            [HYPERCTL, *args],
            stdout=subprocess.PIPE,
            stderr=child,
            env=env,
            text=True,
            timeout=300,
        )
        os.close(child)
        child = -1
        chunks = []
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if child >= 0:
            os.close(child)
        os.close(main)
    return res, b"".join(chunks).decode(errors="replace")


def test_backup_and_migrate_json(prefect_server, tmp_path):
    _, env = prefect_server
    env = {**env, "HYPERSDK_HOME": str(tmp_path / "home"), "COLUMNS": "120"}
    env.pop("PREFECT_LOGGING_LEVEL")  # the user's default
    root = tmp_path / "vms"
    disk = create_vm(root, "web01", {"disk0": SIZE}) / "disk0.img"
    write_realistic_disk(disk, SIZE, seed=8)
    repo = tmp_path / "repo"
    common = ("-s", f"local://{root}", "-t", f"file://{repo}")

    res, terminal = _run(env, "backup", "web01", *common, "--json")
    assert res.returncode == 0, terminal
    full = json.loads(res.stdout)  # the whole of stdout is one JSON object
    assert isinstance(full, dict)
    assert (full["vm"], full["kind"]) == ("web01", "full")
    assert full["target"] == f"file://{repo}"
    assert full["manifest_key"] == f"web01/{full['export_id']}/manifest.json"
    assert (repo / full["manifest_key"]).is_file()
    [d] = full["disks"]
    assert (d["name"], d["kind"], d["format"]) == ("disk0", "full", "qcow2")
    assert d["stored_bytes"] == (repo / d["key"]).stat().st_size
    assert d["virtual_size"] >= SIZE and d["read_bytes"] + d["skipped_bytes"] == d["virtual_size"]
    assert full["duration_seconds"] > 0 and full["verified"] is True
    assert "━" not in terminal  # no progress bars

    mutate_disk(disk, 3, seed=9)
    res, terminal = _run(env, "migrate", "web01", *common, "--json")
    assert res.returncode == 0, terminal
    delta = json.loads(res.stdout)
    assert delta["kind"] == "incremental" and delta["export_id"] != full["export_id"]
    [d2] = delta["disks"]
    assert d2["kind"] == "delta" and d2["parent_key"] == d["key"]
    assert d2["stored_bytes"] == (repo / d2["key"]).stat().st_size < d["stored_bytes"]
    assert "━" not in terminal

    # the text summary names the export id; the stages draw their bars on the terminal (stderr),
    # never into stdout
    mutate_disk(disk, 3, seed=10)
    res, terminal = _run(env, "backup", "web01", *common)
    assert res.returncode == 0, terminal
    points = {p.parent.name for p in repo.glob("web01/*/manifest.json")}
    [newest] = points - {full["export_id"], delta["export_id"]}
    assert f"(export {newest})" in res.stdout
    assert "━" in terminal and "━" not in res.stdout
