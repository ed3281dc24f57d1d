"""A fuzz campaign over every image format reader (tests/fuzz): thousands of seeded mutants of
valid images, each opened by probing and exercised (info, extents, check, bounded reads) in a
child process under RLIMIT_AS and a per-case timeout. Each must end in a result or a typed error
(HyperSDKError) in one line: never another exception, a blanket ``except`` hiding one, a hang
or a blown memory limit. Then the harness itself (mutants on disk, reproducibility, the oracle's
verdicts, the runner's hang/crash handling, the CLI) and one regression test per bug the
campaign found.

``HYPERSDK_FUZZ_SEED`` and ``HYPERSDK_FUZZ_CASES`` change the campaign (the default is fixed,
so CI is reproducible); ``HYPERSDK_FUZZ_OUT`` keeps the findings of a failed run there.
``python -m tests.fuzz`` runs longer campaigns on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hypersdk.errors import FormatError
from hypersdk.formats import _vhdx_layout as VL
from hypersdk.formats import open_image, vdi
from hypersdk.io import FileRangeReader
from tests import qemu
from tests.fixtures.tools import need_tool
from tests.fuzz import campaign as C
from tests.fuzz import seeds as S
from tests.fuzz.mutate import Mutant, make_case
from tests.fuzz.oracle import judge, masked_by
from tests.fuzz.worker import prepare

MiB = 1 << 20
CAMPAIGN = int(os.environ.get("HYPERSDK_FUZZ_SEED", "20250605"))
CASES = int(os.environ.get("HYPERSDK_FUZZ_CASES", "3000"))
QEMU_NAMES = {"vhd": "vpc"}


@pytest.fixture(scope="module")
def seed_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    S.build(root, seed=1)
    return root


@pytest.fixture(scope="module")
def seeds(seed_root) -> list[S.Seed]:
    return S.load(seed_root)


# ------------------------------------------------------------------------------ the campaign
@pytest.mark.slow
def test_campaign(seed_root, seeds, tmp_path):
    """CASES mutants over every seed: no finding. The mix must be real: every seed is
    exercised, and both opened-and-read and refused mutants are common. (The default campaign
    holds case 1561, a VHDX whose metadata region is empty: the reader before its fix fails
    here, see test_vhdx_empty_metadata_region.)"""
    need_tool("qemu-img")  # the Parallels and snapshot seeds are qemu-img's
    assert {s.name for s in seeds} == set(S.BUILDERS)
    limits = C.Limits(timeout=10, memory=1536 * MiB, budget=8 * MiB, workers=2)
    report = C.run(seed_root, CAMPAIGN, range(CASES), limits)
    if report.findings:
        out = Path(os.environ.get("HYPERSDK_FUZZ_OUT") or tmp_path / "findings")
        saved = [C.save(seed_root, f, out) for f in report.findings[:20]]
        replays = "\n".join(f"  python -m tests.fuzz --replay {d}" for d in saved)
        pytest.fail(f"{report.summary()}\nsaved under {out}:\n{replays}")
    assert report.cases == CASES
    assert set(report.by_seed) == {s.name for s in seeds}
    assert report.statuses["ok"] > CASES // 5 and report.statuses["refused"] > CASES // 5, (
        report.summary()
    )


def test_seeds_are_valid(seed_root, seeds, tmp_path):
    """The campaign starts from good images: each opens clean here, and qemu-img checks it and
    reads the same disk (a dirty VHDX needs a writable open to replay, OVAs are ours only)."""
    need_tool("qemu-img")
    for s in seeds:
        path = seed_root / s.dir / s.open
        with open_image(path) as img:
            assert img.format == s.fmt, s.name
            assert img.check() == [], s.name
            ours = tmp_path / f"{s.name}.raw"
            ours.write_bytes(img.read(0, img.virtual_size))
        if s.fmt in ("ova", "raw") or s.name == "vhdx-log":
            continue
        fmt = QEMU_NAMES.get(s.fmt, s.fmt)
        if fmt in ("qcow2", "vdi", "vhdx", "parallels") or s.name in ("vmdk-sparse", "vmdk-stream"):
            qemu.check(path, fmt)
        qemu.compare(path, ours, fmt, "raw")


# ------------------------------------------------------------------------------- the harness
def test_seeds_are_reproducible(seed_root, seeds, tmp_path):
    """Seeds we write are the same bytes on every build (UUIDs, CIDs, times drawn from the
    seed), so a campaign seed names the same cases on every machine."""
    names = ["vhd-dynamic", "vhdx", "vdi", "vmdk-stream", "ova"]
    again = S.build(tmp_path / "again", seed=1, names=names)  # vdi-static, ova-pax... too
    again = [s for s in again if s.name in names]
    ours = [s for s in seeds if s.name in names]
    assert S.digest(tmp_path / "again", again) == S.digest(seed_root, ours)
    other = S.build(tmp_path / "other", seed=2, names=["vdi"])
    vdi_seed = [s for s in seeds if s.name == "vdi"]
    assert S.digest(tmp_path / "other", other) != S.digest(seed_root, vdi_seed)


def test_mutant_on_disk_matches_its_bytes(tmp_path):
    """Writes, truncations, extensions and text replacements: the mutant's bytes equal a plain
    bytearray model, applying it to a copy of the seed gives those bytes, reverting gives the
    seed back."""
    rng = random.Random(5)
    base = rng.randbytes(50_000)
    path = tmp_path / "copy"
    path.write_bytes(base)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(300):
            m, model = Mutant(base), bytearray(base)
            for _ in range(rng.randint(1, 6)):
                op, at = rng.random(), rng.randrange(len(model) + 9000)
                if op < 0.5:
                    data = rng.randbytes(rng.choice([1, 8, 5000]))
                    m.write(at, data)
                    model[len(model) :] = bytes(max(0, at - len(model)))
                    model[at : at + len(data)] = data
                elif op < 0.75:
                    m.truncate(at)
                    del model[at:]
                    model += bytes(at - len(model))
                elif at <= len(model):
                    old, new = rng.randrange(10), rng.randbytes(rng.randrange(10))
                    old = min(old, len(model) - at)
                    m.replace(at, old, new)
                    model[at : at + old] = new
            assert m.to_bytes() == bytes(model)
            m.apply(fd)
            assert path.read_bytes() == bytes(model)
            m.revert(fd)
            assert path.read_bytes() == base
    finally:
        os.close(fd)


def _digest(m: Mutant) -> str:
    h = hashlib.sha256(b"%d %d" % (m.size, m.cut))
    for p in sorted(m.pages):
        h.update(b"%d" % p + m.pages[p])
    return h.hexdigest()


def test_cases_are_reproducible_and_aimed(seed_root, seeds):
    """A case is a function of (seeds, campaign, number); cases differ from their seed and
    from each other; most mutated bytes lie in the seed's structural regions."""
    blobs = {s.name: S.seed_bytes(seed_root, s) for s in seeds}
    aimed = changed = 0
    seen = set()
    for i in range(300):
        a, b = make_case(seeds, blobs, 7, i), make_case(seeds, blobs, 7, i)
        assert (a.seed.name, a.steps, _digest(a.mutant)) == (
            b.seed.name, b.steps, _digest(b.mutant)
        )  # fmt: skip
        seen.add(_digest(a.mutant))
        base = np.frombuffer(blobs[a.seed.name], dtype=np.uint8)
        hits = []  # offsets of changed bytes inside the seed's length
        for p, page in a.mutant.pages.items():
            old = base[p * 4096 : (p + 1) * 4096]
            new = np.frombuffer(page, dtype=np.uint8)[: len(old)]
            hits += (np.flatnonzero(new != old) + p * 4096).tolist()[:64]
        hits = [h for h in hits if h < a.mutant.size]
        if hits:
            changed += 1
            inside = sum(any(lo <= h < lo + n for lo, n in a.seed.regions) for h in hits)
            aimed += inside * 2 > len(hits)
    assert len(seen) > 290
    assert aimed > 0.7 * changed, (aimed, changed)
    other = make_case(seeds, blobs, 8, 0)
    assert (other.seed.name, other.steps) != (make_case(seeds, blobs, 7, 0).seed.name,
                                              make_case(seeds, blobs, 7, 0).steps)  # fmt: skip


def _vdi(seed_root) -> str:
    return str(seed_root / "vdi" / "disk.vdi")


def test_oracle_verdicts(seed_root, tmp_path, monkeypatch):
    """ok, refused (a typed error), exception (anything else), masked (a typed error wrapping
    a deeper driver bug: open_image's catch-all), invariant (a broken contract)."""
    good = _vdi(seed_root)
    assert judge(good).status == "ok"
    short = tmp_path / "short.vdi"
    short.write_bytes(Path(good).read_bytes()[:4096])
    refused = judge(str(short))
    assert (refused.status, refused.kind) == ("refused", ""), refused

    def deep(*_a, **_k):
        raise IndexError("table index out of range")

    with monkeypatch.context() as mp:
        mp.setattr(vdi.VdiImage, "_stored", deep)
        out = judge(good)
    assert (out.status, out.kind) == ("finding", "masked"), out
    assert "IndexError" in out.detail and "vdi.py" in out.where

    with monkeypatch.context() as mp:
        mp.setattr(vdi.VdiImage, "read", lambda *_: struct.unpack("<I", b""))
        out = judge(good)
    assert (out.status, out.kind) == ("finding", "exception"), out
    assert out.detail.startswith("error:") and "Traceback" in out.trace

    with monkeypatch.context() as mp:
        mp.setattr(vdi.VdiImage, "read", lambda self, off, n: b"\0" * (n - 1))
        out = judge(good)
    assert (out.status, out.kind) == ("finding", "invariant") and "gave" in out.detail, out


def test_runner_survives_hangs_crashes_and_memory(seed_root, monkeypatch):
    """A case past the timeout is a hang, a worker killed mid-case a crash, an allocation past
    RLIMIT_AS a MemoryError: each is reported for its case and the rest still run."""
    monkeypatch.setenv("HYPERSDK_FUZZ_FAULTS", "1:hang,2:crash,3:memory,4:raise")
    limits = C.Limits(timeout=2, memory=1536 * MiB, budget=MiB, workers=1)
    report = C.run(seed_root, 3, range(6), limits)
    assert report.cases == 6
    kinds = {f["index"]: (f["kind"], f["detail"].split(":")[0]) for f in report.findings}
    assert kinds == {
        1: ("hang", "no answer within 2 s"),
        2: ("crash", "worker died (exit -9)"),
        3: ("exception", "MemoryError"),
        4: ("exception", "IndexError"),
    }, report.summary()


def test_cli_campaign_and_replay(seed_root, tmp_path):
    """``python -m tests.fuzz`` runs a campaign over the seeds asked for and says what it did;
    a saved case replays."""
    env = os.environ | {"PYTHONPATH": str(C.ROOT)}
    argv = [sys.executable, "-m", "tests.fuzz", "--cases", "40", "--seed", "11", "--format",
            "vdi", "--seeds", str(seed_root), "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=C.ROOT, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "campaign 11: 40 cases" in res.stdout, res.stdout
    assert "vdi-static" in res.stdout and "qcow2" not in res.stdout, res.stdout
    record = {"campaign": 11, "index": 3, "kind": "example"}
    saved = C.save(seed_root, record, tmp_path / "out")
    meta = json.loads((saved / "finding.json").read_text())
    assert meta["steps"] and (saved / meta["mutated"]).exists()
    res = subprocess.run([sys.executable, "-m", "tests.fuzz", "--replay", str(saved)],
                         capture_output=True, text=True, timeout=60, cwd=C.ROOT, env=env)  # fmt: skip
    assert res.returncode == 0 and "case 3 of campaign 11" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------- regressions: what the campaign found
def _vhdx_regions(data: bytearray, edit) -> None:
    """Apply ``edit(entry offset, guid)`` to both region tables' entries and reseal them."""
    for table in VL.REGION_OFFSETS:
        (count,) = struct.unpack_from("<I", data, table + 8)
        for i in range(count):
            at = table + 16 + 32 * i
            edit(at, data[at : at + 16])
        data[table : table + VL.REGION_SIZE] = VL.seal(data[table : table + VL.REGION_SIZE])


def test_vhdx_empty_metadata_region(seed_root, tmp_path):
    """A region table giving the metadata region length 0 (a MiB multiple, inside the file):
    the metadata table was unpacked from zero bytes (struct.error, which open_image's
    catch-all turned into "cannot be opened: unpack_from requires..."). Now a FormatError at
    the source."""
    data = bytearray((seed_root / "vhdx" / "disk.vhdx").read_bytes())

    def empty_metadata(at: int, guid: bytes) -> None:
        if guid == VL.METADATA_GUID.bytes_le:
            struct.pack_into("<I", data, at + 24, 0)

    _vhdx_regions(data, empty_metadata)
    path = tmp_path / "empty-metadata.vhdx"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError) as err:
        open_image(path)
    assert str(path) in str(err.value) and "metadata region of 0 bytes" in str(err.value)
    assert masked_by(err.value) is None
    assert judge(str(path)).status == "refused"


def test_prepare_links_companions(seed_root, seeds, tmp_path):
    """A worker's copy of a seed directory: the mutated file its own (mutating it leaves the
    seed alone), the companions hard links (a backing file stays in the image's directory)."""
    fds = prepare(seed_root, tmp_path, seeds)
    try:
        backing = next(s for s in seeds if s.name == "qcow2-backing")
        mine, theirs = tmp_path / backing.dir, seed_root / backing.dir
        assert (mine / "base.qcow2").stat().st_ino == (theirs / "base.qcow2").stat().st_ino
        assert (mine / backing.mutate).stat().st_ino != (theirs / backing.mutate).stat().st_ino
        os.pwrite(fds[backing.name], b"XXXX", 0)
        assert (theirs / backing.mutate).read_bytes()[:4] == b"QFI\xfb"
        with FileRangeReader(mine / backing.mutate) as r:
            assert r.read(0, 4) == b"XXXX"
    finally:
        for fd in fds.values():
            os.close(fd)
