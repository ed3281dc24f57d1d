"""Screenshots of a finished run in the Prefect UI, for docs/ and the README.

    .venv/bin/python -m tests.ui_screenshots [--out docs/images]   (needs: pip install playwright)

Starts a Prefect server (its own PREFECT_HOME, a free port on 127.0.0.1), runs the demo twice
with `hyperctl demo` (a full export, then an incremental one) against it, and photographs the
second run with headless Chromium (Debian's `chromium`): the flow graph, the logs and the
artifacts. Everything it starts is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.fixtures.prefect_server import free_port, prefect_env, stop
from tests.run_story import flow_run_id

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SHOTS = {  # file name -> the flow run page's tab to click
    "ui-run-graph.png": None,
    "ui-run-artifacts.png": "Artifacts",
    "ui-run-task-runs.png": "Task Runs",
}


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        # the UI asks this URL for its data (by default 4200's)
        env={**prefect_env(home), "PREFECT_UI_API_URL": api},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit("prefect server did not answer in 300 s")


def screenshots(chromium: str, ui: str, run_id: str, out: Path) -> list[Path]:
    """The run's page (graph and logs), then its tabs, and the export's own task run (its
    logs), in Debian's Chromium driven by Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    taken = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader"],
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1300})
        page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="networkidle")
        page.wait_for_timeout(3000)  # the graph lays itself out
        for name, tab in SHOTS.items():
            if tab:
                page.get_by_text(tab, exact=True).first.click()
                page.wait_for_timeout(2000)
            page.screenshot(path=str(out / name))
            taken.append(out / name)
        page.get_by_text("Logs", exact=True).first.click()
        page.set_viewport_size({"width": 1440, "height": 3000})  # the logs list, whole
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out / "ui-run-logs.png"))
        page.set_viewport_size({"width": 1440, "height": 1300})
        taken.append(out / "ui-run-logs.png")
        # a stage task's own page: its log line with bytes and throughput
        page.get_by_text("Task Runs", exact=True).first.click()
        page.get_by_text("upload-disk0").first.click()
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "ui-task-upload.png"))
        taken.append(out / "ui-task-upload.png")
        browser.close()
    return taken


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium is needed (apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hs-shots-"))
    server = None
    try:
        server, api = start_server(work)
        env = {
            **prefect_env(work, api),
            "HYPERSDK_HOME": str(work / "hshome"),
            "PREFECT_UI_URL": api.removesuffix("/api"),
        }
        for _ in range(2):  # a full export, then an incremental one
            res = subprocess.run(
                [str(BIN / "hyperctl"), "demo"], env=env, capture_output=True, text=True
            )
            if res.returncode:
                sys.exit(res.stdout + res.stderr)
        run_id = flow_run_id(res.stdout)
        time.sleep(2)  # the last log batch
        for path in screenshots(chromium, api.removesuffix("/api"), run_id, out):
            print(path)
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HYPERSDK_PREFECT_SERVER", "off")
    sys.exit(main())
