"""Verifying a VM's backup repository (hyperctl verify VM, the verify-backups flow): every point
of a real chain (a full and three HSDELTAs, plain and AES-encrypted) is checked; a flipped byte
in a stored delta is named with its object and offset, the points built on it are bad because
of it, the points before it stay good; a deleted object, an unreadable manifest, a link that
loops and a key outside its point are named; each stored object is read once, on S3 in whole
aligned blocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hypersdk.errors import ObjectNotFoundError
from tests.points import make_vm, run_chain

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
VM = "db01"


def _build_chain(tmp: Path, encrypted: bool) -> tuple[Path, list, Path | None]:
    from hypersdk.crypto.keys import KeySpec, generate_key_file

    root, disk = make_vm(tmp)
    copies = tmp / "copies"
    copies.mkdir()
    key_file = None
    key = None
    if encrypted:
        key_file = tmp / "k"
        generate_key_file(key_file)
        key = KeySpec(method="keyfile", ref=str(key_file)).model_dump()
    results = run_chain(str(root), f"file://{tmp / 'repo'}", disk, copies, key)
    return tmp / "repo", results, key_file


@pytest.fixture(scope="module")
def plain_chain(prefect_api, tmp_path_factory):
    return _build_chain(tmp_path_factory.mktemp("plain"), encrypted=False)


@pytest.fixture(scope="module")
def encrypted_chain(prefect_api, tmp_path_factory):
    return _build_chain(tmp_path_factory.mktemp("enc"), encrypted=True)


def _copy(chain, tmp_path: Path) -> tuple[Path, list[str], list]:
    """A private copy of a chain's repository (tests damage it): (repo, export ids, results)."""
    repo, results, _ = chain
    mine = tmp_path / "repo"
    shutil.copytree(repo, mine)
    return mine, [r.export_id for r in results], results


def _hyperctl(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYPERSDK_HOME": str(home)}
    return subprocess.run([HYPERCTL, *args], env=env, capture_output=True, text=True, timeout=120)


def _lines(res: subprocess.CompletedProcess) -> dict[str, str]:
    """stdout's verdict lines by export id."""
    return {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}


def _verify(repo: Path, at: str = "all", key=None):
    from hypersdk.repository.verify import verify_backups
    from providers import open_target

    with open_target(f"file://{repo}") as target:
        return verify_backups(target, VM, at, key)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _delta_data_byte(path: Path, key=None) -> tuple[int, int]:
    """(plaintext offset of a byte inside the delta's data area, the guest offset it holds)."""
    from hypersdk.formats import get_driver
    from hypersdk.io import FileRangeReader

    reader = FileRangeReader(path)
    if key is not None:
        from hypersdk.crypto import DecryptingReader

        reader = DecryptingReader(reader, key.resolve())
    layer = get_driver("hsdelta").open(reader)
    try:
        first = next(iter(layer.own_extents().data()))
        assert first.length > 100
        return layer.header.data_offset + 100, first.offset + 100
    finally:
        layer.close()


def _chunk_at(repo: Path, export_id: str, guest: int) -> int:
    """The offset of the manifest chunk holding guest byte ``guest`` of the point's disk."""
    doc = json.loads((repo / VM / export_id / "manifest.json").read_bytes())
    return next(o for o, n, _ in doc["disks"][0]["chunks"] if o <= guest < o + n)


# --- a plain chain -----------------------------------------------------------------------------


def test_a_good_chain_verifies_reading_each_object_once(plain_chain, tmp_path, monkeypatch):
    from providers.targets.local import LocalTarget

    repo, ids, results = _copy(plain_chain, tmp_path)
    opened: list[str] = []
    real = LocalTarget.open_coalesced
    monkeypatch.setattr(
        LocalTarget, "open_coalesced", lambda self, key, **o: opened.append(key) or real(self, key)
    )
    verdicts = _verify(repo)
    assert [v.export_id for v in verdicts] == ids
    assert all(v.ok for v in verdicts), [v.problems for v in verdicts]
    assert [v.kind for v in verdicts] == ["full", "delta", "delta", "delta"]
    assert [v.parent for v in verdicts] == [None, *ids[:-1]]
    assert [v.chain for v in verdicts] == [1, 2, 3, 4]
    assert all(v.chunks > 0 and v.objects == 1 for v in verdicts)
    # four points, each judged with its whole chain, yet every object read exactly once
    assert sorted(opened) == sorted(r.disks[0].key for r in results)
    # latest (the default) and one point by id
    assert [v.export_id for v in _verify(repo, "latest")] == ids[-1:]
    assert [v.export_id for v in _verify(repo, ids[1])] == [ids[1]]


def test_cli_names_a_flipped_byte_and_the_points_it_breaks(plain_chain, tmp_path):
    repo, ids, results = _copy(plain_chain, tmp_path)
    url = f"file://{repo}"
    good = _hyperctl("verify", VM, "-t", url, "--all", home=tmp_path)
    assert good.returncode == 0, good.stderr
    assert list(_lines(good)) == ids and all(" OK (" in ln for ln in _lines(good).values())
    latest = _hyperctl("verify", VM, "-t", url, home=tmp_path)  # default: --at latest
    assert latest.returncode == 0 and list(_lines(latest)) == ids[-1:], latest.stderr

    bad_key = results[1].disks[0].key  # the first delta
    at, guest = _delta_data_byte(repo / bad_key)
    _flip(repo / bad_key, at)
    chunk = _chunk_at(repo, ids[1], guest)

    res = _hyperctl("verify", VM, "-t", url, "--all", home=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = _lines(res)
    assert list(lines) == ids
    assert lines[ids[0]].split()[1:3] == ["full", "OK"]
    assert lines[ids[1]].split()[1:3] == ["delta", "BAD:"]
    assert f"{bad_key}: chunk at offset {chunk}: hash mismatch" in lines[ids[1]]
    assert f"{bad_key}: the stored bytes' BLAKE3 differs" in lines[ids[1]]
    assert f"because its parent {ids[1]} is bad" in lines[ids[2]]
    assert f"because its parent {ids[2]} is bad" in lines[ids[3]]
    for later in ids[2:]:  # the root cause, named in every point built on it
        assert f"{bad_key}: chunk at offset {chunk}" in lines[later]
        assert "BAD:" in lines[later]

    # the same, as JSON
    res = _hyperctl("verify", VM, "-t", url, "--all", "--json", home=tmp_path)
    assert res.returncode == 1
    rows = json.loads(res.stdout)
    assert [r["export_id"] for r in rows] == ids
    assert [r["ok"] for r in rows] == [True, False, False, False]
    assert [r["kind"] for r in rows] == ["full", "delta", "delta", "delta"]
    assert rows[0]["problems"] == [] and rows[0]["created"].startswith(ids[0][:4])
    assert any(f"chunk at offset {chunk}" in p for p in rows[1]["problems"])

    # a point before the damage, by id: good
    res = _hyperctl("verify", VM, "-t", url, "--at", ids[0], home=tmp_path)
    assert res.returncode == 0 and " OK (" in res.stdout, res.stdout + res.stderr

    # the parent object of the third point deleted: named, and the last point bad because of it
    gone = results[2].disks[0].key
    (repo / gone).unlink()
    lines = _lines(_hyperctl("verify", VM, "-t", url, "--all", home=tmp_path))
    assert f"{gone}: missing" in lines[ids[2]]
    assert f"because its parent {ids[2]} is bad" in lines[ids[3]]
    assert f"{bad_key}: chunk at offset {chunk}" in lines[ids[1]]

    # the older form still verifies one export by its manifest's key
    one = _hyperctl("verify", f"{VM}/{ids[0]}/manifest.json", "-t", url, home=tmp_path)
    assert one.returncode == 0 and f"{results[0].disks[0].key}: OK (" in one.stdout, one.stderr


def test_mistakes_are_one_line(plain_chain, tmp_path):
    repo, ids, _ = _copy(plain_chain, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, needle in (
        (("verify", "ghost", "-t", f"file://{repo}", "--all"), "no backups of VM 'ghost'"),
        (("verify", VM, "-t", f"file://{empty}"), "no backups of VM 'db01'"),
        (("verify", VM, "-t", f"file://{repo}", "--at", "20990101T000000Z-0000"), "no backup"),
        (("verify", VM, "-t", f"file://{repo}", "--all", "--at", ids[0]), "not both"),
    ):
        res = _hyperctl(*args, home=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert len(lines) == 1 and needle in lines[0], res.stderr
        assert not res.stdout.strip()


def test_broken_manifests_and_links_are_verdicts(plain_chain, tmp_path):
    """An unreadable manifest is a bad point (never skipped), naming its key; a delta whose
    link loops back to itself, and a manifest naming an object outside its point, too."""
    repo, ids, results = _copy(plain_chain, tmp_path)
    mkey = f"{VM}/{ids[1]}/manifest.json"
    doc = json.loads((repo / mkey).read_bytes())
    (repo / mkey).write_text(json.dumps({**doc, "schema": "hypersdk.export/v99"}))
    verdicts = {v.export_id: v for v in _verify(repo)}
    assert verdicts[ids[0]].ok
    assert verdicts[ids[1]].kind is None
    assert verdicts[ids[1]].problems[0].startswith(f"{mkey}: manifest schema")
    assert f"because its parent {ids[1]} is bad ({mkey}: " in verdicts[ids[2]].problems[0]
    assert not verdicts[ids[3]].ok

    # the delta of point 3 made its own parent, point 2's disk naming point 1's object
    (repo / mkey).write_text(json.dumps(doc))
    three = f"{VM}/{ids[3]}/manifest.json"
    loop = json.loads((repo / three).read_bytes())
    loop["disks"][0]["parent"]["export_id"] = ids[3]
    (repo / three).write_text(json.dumps(loop))
    two = f"{VM}/{ids[2]}/manifest.json"
    outside = json.loads((repo / two).read_bytes())
    outside["disks"][0]["key"] = results[1].disks[0].key
    (repo / two).write_text(json.dumps(outside))
    verdicts = {v.export_id: v for v in _verify(repo)}
    assert verdicts[ids[0]].ok and verdicts[ids[1]].ok
    assert verdicts[ids[2]].problems == [
        f"{results[1].disks[0].key}: outside its point's directory {VM}/{ids[2]}/: not read"
    ]
    assert any("loops back" in p for p in verdicts[ids[3]].problems)


def test_a_manifest_that_disagrees_with_its_delta_names_the_field(plain_chain, tmp_path):
    """A manifest whose parent size was raised to 2^62 (hostile, or a bug): the verdict names
    the field the delta's own header disagrees on, at once (nothing sized by the claim)."""
    repo, ids, _ = _copy(plain_chain, tmp_path)
    mkey = f"{VM}/{ids[1]}/manifest.json"
    doc = json.loads((repo / mkey).read_bytes())
    doc["disks"][0]["parent"]["virtual_size"] = 2**62
    (repo / mkey).write_text(json.dumps(doc))
    verdicts = {v.export_id: v for v in _verify(repo)}
    assert verdicts[ids[0]].ok and not verdicts[ids[1]].ok
    assert "disagree on its parent size (" in verdicts[ids[1]].problems[0]
    assert f"against {2**62})" in verdicts[ids[1]].problems[0]


# --- an encrypted chain ------------------------------------------------------------------------


def test_encrypted_chain_names_the_tampered_object(encrypted_chain, tmp_path):
    from hypersdk.crypto.container import HEADER_SIZE, TAG, parse_header
    from hypersdk.crypto.keys import KeySpec

    repo, ids, results = _copy(encrypted_chain, tmp_path)
    key_file = encrypted_chain[2]
    url = f"file://{repo}"
    good = _hyperctl("verify", VM, "-t", url, "--all", "--key-file", str(key_file), home=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert all(" OK (" in ln for ln in _lines(good).values()) and len(_lines(good)) == 4
    no_key = _hyperctl("verify", VM, "-t", url, home=tmp_path)
    assert no_key.returncode == 1 and "give its key" in no_key.stdout

    bad_key = results[1].disks[0].key
    assert bad_key.endswith(".hsdelta.hsenc")
    plain_at, _ = _delta_data_byte(repo / bad_key, KeySpec(method="keyfile", ref=str(key_file)))
    chunk = parse_header((repo / bad_key).read_bytes()[:HEADER_SIZE]).chunk_size
    index = plain_at // chunk
    _flip(repo / bad_key, HEADER_SIZE + index * (chunk + TAG) + plain_at % chunk)
    stored = HEADER_SIZE + index * (chunk + TAG)

    res = _hyperctl("verify", VM, "-t", url, "--all", "--key-file", str(key_file), home=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    lines = _lines(res)
    assert " OK (" in lines[ids[0]]
    assert f"{bad_key}: encrypted chunk {index} at offset {stored} " in lines[ids[1]]
    assert "fails authentication" in lines[ids[1]]
    for later, parent in zip(ids[2:], ids[1:], strict=False):
        assert f"because its parent {parent} is bad ({bad_key}: " in lines[later]


# --- the flow ----------------------------------------------------------------------------------


def test_flow_publishes_the_table_then_fails(plain_chain, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.verify import verify_backups

    repo, ids, results = _copy(plain_chain, tmp_path)
    rows = verify_backups(vm=VM, target=f"file://{repo}")
    assert [r["export_id"] for r in rows] == ids and all(r["ok"] for r in rows)

    bad_key = results[2].disks[0].key
    at, _ = _delta_data_byte(repo / bad_key)
    _flip(repo / bad_key, at)
    state = verify_backups(vm=VM, target=f"file://{repo}", at="all", return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=f"2 of 4 point\\(s\\) of {VM} are bad"):
        state.result()

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    (latest,) = [a for a in asyncio.run(artifact()) if a.key == f"verify-{VM}"]
    table = json.loads(latest.data) if isinstance(latest.data, str) else latest.data
    assert [r["export id"] for r in table] == ids
    assert [r["verdict"].split()[0] for r in table] == ["OK", "OK", "BAD:", "BAD:"]
    assert bad_key in table[2]["verdict"] and f"parent {ids[2]}" in table[3]["verdict"]
    assert [r["kind"] for r in table] == ["full", "delta", "delta", "delta"]


def test_flow_takes_a_key_reference_and_refuses_secrets(encrypted_chain, tmp_path):
    from flows.verify import verify_backups
    from hypersdk.errors import InvalidParameterError

    repo, ids, _ = _copy(encrypted_chain, tmp_path)
    key = {"method": "keyfile", "ref": str(encrypted_chain[2])}
    rows = verify_backups(vm=VM, target=f"file://{repo}", at="latest", encryption=key)
    assert [(r["export_id"], r["ok"], r["chain"]) for r in rows] == [(ids[-1], True, 4)]
    # a secret in the target URL: refused before a run exists, the secret never shown
    with pytest.raises(InvalidParameterError, match="secret") as refused:
        verify_backups(vm=VM, target="s3://bucket/p?secret_access_key=hunter2", encryption=key)
    assert "hunter2" not in str(refused.value)


def test_engine_errors_are_typed(plain_chain, tmp_path):
    repo, _, _ = _copy(plain_chain, tmp_path)
    with pytest.raises(ObjectNotFoundError, match="no backups of VM 'ghost'"):
        from hypersdk.repository.verify import verify_backups
        from providers import open_target

        with open_target(f"file://{repo}") as target:
            verify_backups(target, "ghost")
    with pytest.raises(ObjectNotFoundError, match="no backup 'nope'"):
        _verify(repo, "nope")


# --- S3: every object read once, in whole aligned blocks ---------------------------------------


def test_on_s3_each_object_is_fetched_once_in_whole_blocks(plain_chain, moto_s3):
    from hypersdk.repository.verify import verify_backups
    from providers.targets.s3 import S3Target

    repo, results, _ = plain_chain
    t = S3Target.from_url(f"s3://{moto_s3.new_bucket()}/p", **moto_s3.options())
    for path in sorted(p for p in repo.rglob("*") if p.is_file() and p.name != "lock.json"):
        t.put_bytes(path.relative_to(repo).as_posix(), path.read_bytes())
    gets: list[tuple[str, str]] = []
    t.client.meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **_: gets.append((params["Key"], params.get("Range", ""))),
    )
    try:
        verdicts = verify_backups(t, VM)
    finally:
        t.close()
    assert len(verdicts) == 4 and all(v.ok for v in verdicts), [v.problems for v in verdicts]
    block = 8 * 1024 * 1024
    objects = {f"p/{r.disks[0].key}": r.disks[0].object_size for r in results}
    fetched = [(k, r) for k, r in gets if k in objects]
    assert len(fetched) == len(set(fetched)), fetched  # no block fetched twice
    assert len(fetched) == sum(-(-size // block) for size in objects.values())
    for k, r in fetched:
        start, end = map(int, r.removeprefix("bytes=").split("-"))
        assert start % block == 0 and end + 1 == min(start + block, objects[k]), (k, r)
