"""``python -m tests.fuzz``: a fuzz campaign on demand, as long as asked.

    python -m tests.fuzz --minutes 30 --seed 7 --out /tmp/findings
    python -m tests.fuzz --cases 20000 --format qcow2 --format vhdx
    python -m tests.fuzz --replay /tmp/findings/exception-vhd-dynamic-7-1234

Each finding is written to ``--out`` as a directory (the mutated file, the seed's companion
files, finding.json with the campaign seed, the case number, the mutations and the outcome);
``--replay`` runs the oracle on one such directory in this process and prints the traceback.
Exit status: 1 if anything was found, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz import campaign as C
from tests.fuzz import seeds as S
from tests.fuzz.oracle import judge_as

MiB = 1 << 20


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, help="number of cases (default: until --minutes)")
    p.add_argument(
        "--minutes", type=float, help="stop after this long (default 10 without --cases)"
    )
    p.add_argument("--seed", type=int, default=int(time.time()), help="campaign seed")
    p.add_argument("--first", type=int, default=0, help="first case number")
    p.add_argument("--format", action="append", help="only these seeds: a seed name or format")
    p.add_argument("--out", default="fuzz-findings", help="directory for findings")
    p.add_argument("--seeds", help="seed directory to reuse (all seeds built there if missing)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    p.add_argument("--memory-mib", type=int, default=1536, help="RLIMIT_AS per worker")
    p.add_argument("--budget-mib", type=int, default=64, help="virtual disk read per case")
    p.add_argument("--stack", type=int, default=4, help="mutations per case, at most")
    p.add_argument("--replay", help="a finding directory to run again, here")
    return p.parse_args(argv)


def replay(directory: str) -> int:
    d = Path(directory)
    meta = json.loads((d / "finding.json").read_text())
    out = judge_as(str(d / meta["open"]), meta["format"])
    print(f"{meta['seed']} case {meta['index']} of campaign {meta['campaign']}: {meta['steps']}")
    print(f"{out.status} {out.kind} {out.detail}\n{out.trace}")
    return 1 if out.status == "finding" else 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.replay:
        return replay(args.replay)
    minutes = args.minutes if args.minutes is not None else (None if args.cases else 10.0)
    deadline = time.monotonic() + minutes * 60 if minutes is not None else None
    limits = C.Limits(
        args.timeout, args.memory_mib * MiB, args.budget_mib * MiB, args.workers, stack=args.stack
    )
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="hypersdk-seeds-") as tmp:
        root = Path(args.seeds or Path(tmp) / "all")
        if not (root / S.MANIFEST).exists():
            S.build(root)
        if args.format:  # a case number means a case of this selection of seeds
            root = S.view(root, args.format, Path(tmp) / "selected")
        seeds = S.load(root)
        print(f"seeds {S.digest(root, seeds)}: {', '.join(s.name for s in seeds)}", flush=True)
        stop = args.first + args.cases if args.cases else None
        cases = range(args.first, stop) if stop is not None else _count(args.first)

        def on_record(rec: dict) -> None:
            if rec["status"] == "finding":
                where = C.save(root, rec, out)
                print(f"finding {rec['kind']} {rec['seed']} case {rec['index']}: "
                      f"{rec['detail'][:200]} -> {where}", flush=True)  # fmt: skip

        report = C.run(root, args.seed, cases, limits, deadline, on_record)
    print(report.summary())
    return 1 if report.findings else 0


def _count(first: int):
    n = first
    while True:
        yield n
        n += 1


if __name__ == "__main__":
    sys.exit(main())
