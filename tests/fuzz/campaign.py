"""The parent of a fuzz campaign: a few worker processes, a queue of case numbers, a clock.

Each worker (worker.py) runs under ``RLIMIT_AS`` and answers one JSON line per case. The parent
sends one case at a time to each, and owns the per-case timeout: a worker silent past it is
killed (the case is a ``hang``), a worker that dies is a ``crash``; either way a fresh worker
takes the remaining cases. Findings are regenerated here from (seeds, campaign seed, case
number), which is what makes them reproducible, and saved with their companions by ``save``.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz import seeds as S
from tests.fuzz.mutate import STACK, make_case

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]  # the checkout: workers import tests.fuzz from it


@dataclass
class Limits:
    timeout: float = 10.0  # seconds per case
    memory: int = 1536 * MiB  # RLIMIT_AS of a worker
    budget: int = 64 * MiB  # bytes of the virtual disk read per case
    workers: int = 2
    startup: float = 120.0  # seconds a worker may take to load the seeds
    stack: int = STACK  # mutations per case, at most


@dataclass
class Report:
    campaign: int
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_seed: dict[str, Counter] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    slowest: tuple[float, int] = (0.0, -1)

    def add(self, record: dict) -> None:
        self.cases += 1
        self.statuses[record["status"]] += 1
        self.by_seed.setdefault(record["seed"], Counter())[record["status"]] += 1
        if record.get("seconds", 0) > self.slowest[0]:
            self.slowest = (record["seconds"], record["index"])
        if record["status"] == "finding":
            self.findings.append(record)

    def signatures(self) -> dict[str, list[dict]]:
        """Findings grouped by signature (one bug each, as far as a signature can tell)."""
        out: dict[str, list[dict]] = {}
        for f in self.findings:
            key = f"{f['seed']} {f['kind']}:{f['detail'].split(':', 1)[0]}@{f['where']}"
            out.setdefault(key, []).append(f)
        return out

    def summary(self) -> str:
        lines = [
            f"campaign {self.campaign}: {self.cases} cases in {self.seconds:.1f} s "
            f"({dict(self.statuses)}); slowest case {self.slowest[1]} "
            f"({self.slowest[0]:.2f} s)"
        ]
        for seed, c in sorted(self.by_seed.items()):
            lines.append(f"  {seed:16} {dict(c)}")
        for key, group in self.signatures().items():
            f = group[0]
            lines.append(f"FINDING x{len(group)} {key}: case {f['index']} {f['steps']}")
            lines.append(f"    {f['detail'][:300]}")
        return "\n".join(lines)


class _Worker:
    def __init__(self, slot: int, seeds_root: Path, work: Path, campaign: int, limits: Limits):
        self.slot = slot
        self.args = (seeds_root, work / f"w{slot}", campaign, limits)
        self.proc: subprocess.Popen | None = None
        self.case: int | None = None
        self.sent = 0.0
        self.buffer = b""
        self.log = work / f"w{slot}.stderr"

    def start(self) -> None:
        seeds_root, work, campaign, limits = self.args
        argv = [sys.executable, "-m", "tests.fuzz.worker", str(seeds_root), str(work),
                str(campaign), str(limits.budget), str(limits.memory), str(limits.stack)]  # fmt: skip
        env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=env
            )
        self.case, self.buffer = None, b""
        deadline = time.monotonic() + limits.startup
        while b"READY\n" not in self.buffer:
            line = self._read(deadline)
            if line is None:
                self.stop()
                raise RuntimeError(f"fuzz worker did not start: {self.tail()}")
        self.buffer = b""

    def _read(self, deadline: float) -> bytes | None:
        """More output (appended to the buffer), or None on EOF or deadline."""
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                return None
        finally:
            sel.close()
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return None
        self.buffer += chunk
        return chunk

    def send(self, index: int) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.case, self.sent = index, time.monotonic()
        self.proc.stdin.write(b"%d\n" % index)
        self.proc.stdin.flush()

    def tail(self) -> str:
        try:
            return self.log.read_bytes()[-1500:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self.proc = None


def run(
    seeds_root: str | os.PathLike,
    campaign: int,
    cases: Iterable[int],
    limits: Limits | None = None,
    deadline: float | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> Report:
    """Run ``cases`` (until ``deadline``, a time.monotonic() value, if given)."""
    limits = limits or Limits()
    seeds_root = Path(seeds_root).resolve()
    report = Report(campaign)
    started = time.monotonic()
    queue: Iterator[int] = iter(cases)
    with tempfile.TemporaryDirectory(prefix="hypersdk-fuzz-") as tmp:
        work = Path(tmp)
        workers = [_Worker(i, seeds_root, work, campaign, limits) for i in range(limits.workers)]
        try:
            for w in workers:
                w.start()
            _loop(workers, queue, limits, deadline, report, on_record)
        finally:
            for w in workers:
                w.stop()
    report.seconds = time.monotonic() - started
    return report


def _next(queue: Iterator[int], deadline: float | None) -> int | None:
    if deadline is not None and time.monotonic() >= deadline:
        return None
    return next(queue, None)


def _loop(workers, queue, limits, deadline, report, on_record) -> None:
    def record(rec: dict) -> None:
        rec["campaign"] = report.campaign
        report.add(rec)
        if on_record is not None:
            on_record(rec)

    for w in workers:
        index = _next(queue, deadline)
        if index is not None:
            w.send(index)
    while any(w.case is not None for w in workers):
        sel = selectors.DefaultSelector()
        busy = [w for w in workers if w.case is not None]
        for w in busy:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        soonest = min(w.sent + limits.timeout for w in busy)
        ready = sel.select(max(0.0, soonest - time.monotonic()))
        sel.close()
        for key, _ in ready:
            w = key.data
            chunk = os.read(w.proc.stdout.fileno(), 65536)
            if not chunk:  # the worker died in the middle of its case
                code = w.proc.wait()
                record(_lost(w, "crash", f"worker died (exit {code}): {w.tail()[-600:]}"))
                _restart(w, queue, deadline)
                continue
            w.buffer += chunk
            while b"\n" in w.buffer and w.case is not None:
                line, w.buffer = w.buffer.split(b"\n", 1)
                record(json.loads(line))
                w.case = None
                index = _next(queue, deadline)
                if index is not None:
                    w.send(index)
        now = time.monotonic()
        for w in workers:
            if w.case is not None and now - w.sent > limits.timeout:
                record(_lost(w, "hang", f"no answer within {limits.timeout:g} s"))
                _restart(w, queue, deadline)


def _lost(w: _Worker, kind: str, detail: str) -> dict:
    seeds_root, _, campaign, limits = w.args
    seeds = S.load(seeds_root)
    blobs = {s.name: S.seed_bytes(seeds_root, s) for s in seeds}
    case = make_case(seeds, blobs, campaign, w.case, limits.stack)
    return {"index": w.case, "seed": case.seed.name, "steps": case.steps, "status": "finding",
            "stack": limits.stack,
            "kind": kind, "detail": detail, "where": "?", "trace": "", "seconds": 0.0}  # fmt: skip


def _restart(w: _Worker, queue: Iterator[int], deadline: float | None) -> None:
    w.stop()
    w.case = None
    index = _next(queue, deadline)
    if index is not None:
        w.start()
        w.send(index)


def save(seeds_root: str | os.PathLike, record: dict, out: str | os.PathLike) -> Path:
    """A finding as a directory: the seed's companions, the mutated file under the seed's
    name, and finding.json (campaign seed, case, steps, outcome, how to replay)."""
    seeds_root = Path(seeds_root)
    seeds = S.load(seeds_root)
    blobs = {s.name: S.seed_bytes(seeds_root, s) for s in seeds}
    campaign = record["campaign"]
    case = make_case(seeds, blobs, campaign, record["index"], record.get("stack", STACK))
    d = Path(out) / f"{record['kind']}-{case.seed.name}-{campaign}-{record['index']}"
    d.mkdir(parents=True, exist_ok=True)
    for f in (seeds_root / case.seed.dir).iterdir():
        if f.name != case.seed.mutate:
            shutil.copyfile(f, d / f.name)
    (d / case.seed.mutate).write_bytes(case.mutant.to_bytes())
    meta = record | {"seed": case.seed.name, "steps": case.steps, "open": case.seed.open,
                     "mutated": case.seed.mutate, "format": case.seed.fmt,
                     "replay": f"python -m tests.fuzz --replay {d}"}  # fmt: skip
    (d / "finding.json").write_text(json.dumps(meta, indent=1))
    return d
