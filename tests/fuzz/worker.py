"""A fuzz worker: a child process that runs the cases its parent sends, one at a time.

Started by ``campaign.py`` as ``python -m tests.fuzz.worker SEEDS WORK CAMPAIGN BUDGET MEMORY
STACK``.
It limits its own address space (``RLIMIT_AS``), copies every seed directory into ``WORK`` (the
mutated file a real copy, its companions hard links: a backing file or a flat extent must sit
in the opened file's own directory), says ``READY``, then for each case number read on stdin
makes the case, writes it over its copy of the seed, judges it, puts the seed back and answers
one JSON line. Protocol lines go to the original stdout; anything the code under test prints
goes to stderr. The parent owns the clock: a case that does not answer in time is killed there.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from tests.fuzz import seeds as S
from tests.fuzz.mutate import make_case
from tests.fuzz.oracle import judge_as


def prepare(seeds_root: Path, work: Path, seeds: list[S.Seed]) -> dict[str, int]:
    """Per-seed working copies; the open descriptor of each mutated file."""
    fds = {}
    for s in seeds:
        d = work / s.dir
        d.mkdir(parents=True, exist_ok=True)
        for f in (seeds_root / s.dir).iterdir():
            target = d / f.name
            if target.exists():
                target.unlink()
            if f.name == s.mutate:
                shutil.copyfile(f, target)
            else:
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copyfile(f, target)
        fds[s.name] = os.open(d / s.mutate, os.O_RDWR)
    return fds


def _faulty(kind: str):
    def hang(path, *a, **k):
        time.sleep(3600)

    def crash(path, *a, **k):
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would

    def memory(path, *a, **k):
        return bytearray(1 << 40)  # past any RLIMIT_AS: MemoryError

    def fail(path, *a, **k):
        return [][1]

    return {"hang": hang, "crash": crash, "memory": memory, "raise": fail}[kind]


@contextlib.contextmanager
def fault(kind: str | None) -> Iterator[None]:
    """A misbehaving ``open_image`` for one case (tests of the harness), else nothing."""
    if kind is None:
        yield
        return
    import hypersdk.formats

    with mock.patch.object(hypersdk.formats, "open_image", _faulty(kind)):
        yield


def main(argv: list[str]) -> int:
    seeds_root, work, campaign, budget, memory, stack = (
        Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
    )  # fmt: skip
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core in the checkout
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the code under test prints must not corrupt the protocol
    sys.stdout = sys.stderr
    seeds = S.load(seeds_root)
    blobs = {s.name: S.seed_bytes(seeds_root, s) for s in seeds}
    fds = prepare(seeds_root, work, seeds)
    spec = os.environ.get("HYPERSDK_FUZZ_FAULTS", "")
    faults = {int(i): kind for i, kind in (f.split(":") for f in spec.split(",") if f)}
    out.write("READY\n")
    for line in sys.stdin:
        index = int(line)
        case = make_case(seeds, blobs, campaign, index, stack)
        fd = fds[case.seed.name]
        case.mutant.apply(fd)
        try:
            with fault(faults.get(index)):
                path = str(work / case.seed.dir / case.seed.open)
                outcome = judge_as(path, case.seed.fmt, budget)
        finally:
            case.mutant.revert(fd)
        record = {"index": index, "seed": case.seed.name, "steps": case.steps, "stack": stack}
        out.write(json.dumps(record | outcome.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
