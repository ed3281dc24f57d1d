"""Verify a VM's backup points: each manifest, each parent link, each stored object of each chain.

A point is good when its manifest reads, every object it names is what the manifest says (size,
BLAKE3 of the stored bytes, BLAKE3 of every chunk of the guest bytes it defines, a delta's own
header naming the same parent), every parent link holds (the parent point exists, its object
is the one the delta was made on, sizes agree), and the point it builds on is good. Nothing is
skipped: an unreadable manifest is a bad point, not a missing one.

Later points share their parents' objects, so each point is judged once and its verdict reused
by its children ("bad because its parent X is bad"): every stored object is read once, through
the target's coalescing reader (one pass of large aligned ranged reads serves both the object
hash and the chunk hashes while the object fits its cache), whatever the number of points.
Chains are walked without recursion; a chain that loops is a problem of the link that closes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hypersdk.errors import (
    DecryptionError,
    FormatError,
    HyperSDKError,
    ObjectNotFoundError,
)
from hypersdk.manifest import DiskManifest, ExportManifest, read_manifest
from hypersdk.references import printable
from hypersdk.repository.chain import _check_header
from hypersdk.repository.layout import MANIFEST_NAME, export_prefix, manifest_key, vm_prefix
from hypersdk.repository.restore import points
from hypersdk.verify import _check_disk, _object_hash, open_logical

log = logging.getLogger(__name__)

MAX_LINES_PER_OBJECT = 10  # bad chunks named per object; the rest are counted


@dataclass
class PointVerdict:
    """What verifying one point found: ok, or one line per problem, each naming the object (or
    the link) and, for a bad chunk, its guest offset."""

    export_id: str
    created: datetime | None = None
    kind: str | None = None  # "full" or "delta"; None when the manifest cannot be read
    problems: list[str] = field(default_factory=list)
    chunks: int = 0  # chunk hashes checked in this point's own objects
    objects: int = 0  # stored objects of its own that were read
    parent: str | None = None  # the point it builds on (a full: None)
    chain: int = 1  # points in its chain, itself included: all judged to judge it

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "export_id": self.export_id,
            "created": self.created.isoformat() if self.created else None,
            "kind": self.kind,
            "ok": self.ok,
            "problems": list(self.problems),
            "chunks": self.chunks,
            "objects": self.objects,
            "parent": self.parent,
            "chain": self.chain,
        }

    def summary(self) -> str:
        """``OK (123 chunks)`` or ``BAD: problem; problem``: one line."""
        if self.ok and self.chain > 1:
            return f"OK ({self.chunks} chunks; a chain of {self.chain} points)"
        if self.ok:
            return f"OK ({self.chunks} chunks)"
        return "BAD: " + "; ".join(self.problems)


def verify_backups(
    target: Any, vm: str, at: str = "all", encryption: Any | None = None
) -> list[PointVerdict]:
    """Verdicts of ``vm``'s points on ``target``, oldest first: every point (``at="all"``), the
    newest (``"latest"``) or the one with that export id; a point is judged with its whole
    chain. ``encryption``: the KeySpec of an encrypted repository (AES container objects are
    decrypted on the fly; GPG objects have only their stored bytes checked). No backups of
    ``vm``, or no point ``at``: ObjectNotFoundError."""
    listed = points(target, vm)
    if not listed:
        raise ObjectNotFoundError(f"no backups of VM {printable(vm)!r} on {target.url}")
    if at == "all":
        wanted = listed
    elif at == "latest":
        wanted = listed[-1:]
    elif at in listed:
        wanted = [at]
    else:
        raise ObjectNotFoundError(
            f"no backup {printable(at)!r} of VM {printable(vm)!r} on {target.url} "
            f"(its {len(listed)} point(s) run from {listed[0]} to {listed[-1]})"
        )
    verifier = _Verifier(target, vm, listed, encryption)
    verdicts = [verifier.verdict(pid) for pid in wanted]
    log.info(
        "verified %d point(s) of %s on %s: %d bad; %d object(s) read",
        len(verdicts),
        vm,
        target.url,
        sum(not v.ok for v in verdicts),
        verifier.objects_read,
    )
    return verdicts


def _line(key: str, exc: BaseException, name: str | None = None) -> str:
    """``key: problem`` for an error, whatever name (a local path, a reader's) it starts with."""
    text = exc.problem if isinstance(exc, FormatError) else str(exc)
    for prefix in (name, key):
        if prefix and text.startswith(f"{prefix}: "):
            text = text[len(prefix) + 2 :]
    return printable(f"{key}: {' '.join(text.split())}")


def _named_lines(key: str, what: list[str], more: str) -> list[str]:
    """At most MAX_LINES_PER_OBJECT lines, then one saying how many more."""
    lines = [f"{key}: {w}" for w in what[:MAX_LINES_PER_OBJECT]]
    if len(what) > MAX_LINES_PER_OBJECT:
        lines.append(f"{key}: and {len(what) - MAX_LINES_PER_OBJECT} more {more}")
    return lines


@dataclass(frozen=True)
class _Entry:
    """What a child's link to a disk of this point is checked against."""

    key: str
    object_blake3: str
    hashes: frozenset[str]  # its object's BLAKE3, and that of the delta a synthetic full replaced
    virtual_size: int


@dataclass(frozen=True)
class _Summary:
    parents: list[str]
    disks: dict[str, _Entry]

    @classmethod
    def of(cls, m: ExportManifest) -> _Summary:
        disks = {}
        for d in m.disks:
            hashes = {d.object_blake3}
            if d.replaces is not None:  # a synthetic full stands in for the delta it replaced
                hashes.add(d.replaces.object_blake3)
            disks.setdefault(
                d.name, _Entry(d.key, d.object_blake3, frozenset(hashes), d.virtual_size)
            )
        parents = sorted({d.parent.export_id for d in m.disks if d.parent is not None})
        return cls(parents, disks)


class _Verifier:
    """Verdicts of one VM's points, each computed once (a child reuses its parent's)."""

    def __init__(self, target: Any, vm: str, listed: list[str], encryption: Any | None):
        self.target = target
        self.vm = vm
        self.listed = set(listed)
        self.encryption = encryption
        self._key: Any | None = None
        if encryption is not None and getattr(encryption, "method", None) != "gpg":
            self._key = encryption.resolve()  # a missing key file: one error, before any read
        # what links are checked against, per point (never whole manifests: a chunk list can
        # be tens of MB, and a repository holds many points); or why its manifest is unreadable
        self._summaries: dict[str, _Summary | str] = {}
        self._last: tuple[str, ExportManifest | str] | None = None  # the manifest read last
        self._verdicts: dict[str, PointVerdict] = {}
        self._causes: dict[str, str] = {}  # a bad point's root cause: its own first problem
        self.objects_read = 0

    # --- points -----------------------------------------------------------------------------
    def verdict(self, pid: str) -> PointVerdict:
        """``pid``'s verdict, its ancestors judged first (depth first, no recursion)."""
        stack: list[tuple[str, bool]] = [(pid, False)]
        on_path: set[str] = set()
        while stack:
            node, expanded = stack.pop()
            if node in self._verdicts:
                continue
            if expanded:
                on_path.discard(node)
                self._verdicts[node] = self._judge(node)
                continue
            on_path.add(node)
            stack.append((node, True))
            for parent in self._parents(node):
                # a parent on the path closes a loop: _judge names the link
                if parent in self.listed and parent not in self._verdicts and parent not in on_path:
                    stack.append((parent, False))
        return self._verdicts[pid]

    def _manifest(self, pid: str) -> ExportManifest | str:
        """The point's manifest, or the line saying why it cannot be read. Only the last one
        read is kept (a point's expansion and its verdict usually follow each other)."""
        if self._last is not None and self._last[0] == pid:
            return self._last[1]
        try:
            key = manifest_key(self.vm, pid)
        except HyperSDKError as exc:  # a listed directory that is no export id
            found: ExportManifest | str = _line(f"{vm_prefix(self.vm)}{pid}/{MANIFEST_NAME}", exc)
        else:
            try:
                found = read_manifest(self.target, key)
            except ObjectNotFoundError:
                found = f"{key}: gone (deleted while verifying?)"
            except HyperSDKError as exc:
                if exc.retryable:  # the target failed, not the manifest: no verdict
                    raise
                found = _line(key, exc)
        self._last = (pid, found)
        return found

    def _summary(self, pid: str) -> _Summary | str:
        if pid not in self._summaries:
            m = self._manifest(pid)
            self._summaries[pid] = m if isinstance(m, str) else _Summary.of(m)
        return self._summaries[pid]

    def _parents(self, pid: str) -> list[str]:
        summary = self._summary(pid)
        return [] if isinstance(summary, str) else summary.parents

    def _judge(self, pid: str) -> PointVerdict:
        m = self._manifest(pid)
        self._summaries.setdefault(pid, m if isinstance(m, str) else _Summary.of(m))
        if isinstance(m, str):
            verdict = PointVerdict(pid, problems=[m])
            self._causes[pid] = m
            return verdict
        deltas = [d for d in m.disks if d.kind == "delta"]
        parents = self._parents(pid)
        verdict = PointVerdict(
            pid,
            created=m.created,
            kind="delta" if deltas else "full",
            parent=parents[0] if parents else None,
            chain=1
            + max((self._verdicts[p].chain for p in parents if p in self._verdicts), default=0),
        )
        mkey = manifest_key(self.vm, pid)
        if m.export_id != pid:
            verdict.problems.append(
                f"{mkey}: names export id {printable(m.export_id)!r}, not its own {pid}"
            )
        if not m.disks:
            verdict.problems.append(f"{mkey}: holds no disks")
        self._check_objects(pid, m.disks, verdict)
        for d in deltas:
            verdict.problems += self._link_problems(d)
        own = list(verdict.problems)
        for parent in parents:
            judged = self._verdicts.get(parent)
            if judged is not None and not judged.ok:
                child = next(d for d in deltas if d.parent and d.parent.export_id == parent)
                verdict.problems.append(
                    f"{child.key}: bad because its parent {parent} is bad ({self._causes[parent]})"
                )
        if own:
            self._causes[pid] = own[0]
        elif not verdict.ok:  # only inherited: the root cause of the parent that made it bad
            bad_parent = next(
                p for p in parents if p in self._verdicts and not self._verdicts[p].ok
            )
            self._causes[pid] = self._causes[bad_parent]
        log.info("point %s of %s: %s", pid, self.vm, verdict.summary())
        return verdict

    def _link_problems(self, d: DiskManifest) -> list[str]:
        """Does the parent ``d`` names hold what ``d`` was made on? (chain.load_chain's checks,
        as lines; a parent that is bad in itself is said by the caller)."""
        link = d.parent
        assert link is not None  # the manifest model guarantees it for a delta
        where = f"{d.key}: link to parent {link.export_id}"
        if link.export_id not in self.listed:
            gone = manifest_key(self.vm, link.export_id)
            return [f"{where}: the parent point is gone (no {gone})"]
        if link.export_id not in self._verdicts:
            return [f"{where}: the chain loops back to a point that builds on this one"]
        summary = self._summary(link.export_id)
        if isinstance(summary, str):
            return []  # the parent's verdict says why
        parent = summary.disks.get(link.disk)
        if parent is None:
            return [f"{where}: the parent point has no disk {printable(link.disk)!r}"]
        if link.object_blake3 not in parent.hashes:
            return [
                f"{where}: {parent.key} is not the object the delta was made on (BLAKE3 "
                f"{parent.object_blake3[:16]}..., the delta names {link.object_blake3[:16]}...)"
            ]
        if parent.virtual_size != link.virtual_size:
            return [
                f"{where}: {parent.key} holds {parent.virtual_size} bytes, the delta says "
                f"{link.virtual_size}"
            ]
        return []

    # --- objects ----------------------------------------------------------------------------
    def _check_objects(self, pid: str, disks: list[DiskManifest], verdict: PointVerdict) -> None:
        """Each stored object of the point read once (the disks of a package share one)."""
        home = export_prefix(self.vm, pid)
        by_key: dict[str, list[DiskManifest]] = {}
        for d in disks:
            by_key.setdefault(d.key, []).append(d)
        for key, entries in by_key.items():
            if not key.startswith(home):
                verdict.problems.append(
                    f"{printable(key)}: outside its point's directory {home}: not read"
                )
                continue
            problems, chunks = self._check_object(key, entries)
            verdict.problems += problems
            verdict.chunks += chunks
            verdict.objects += 1

    def _check_object(self, key: str, entries: list[DiskManifest]) -> tuple[list[str], int]:
        """(problems, chunk hashes checked) of one stored object against its manifest entries:
        size, then the object's BLAKE3, then each entry's chunks through one reader."""
        try:
            reader = self.target.open_coalesced(key)
        except ObjectNotFoundError:
            return [f"{key}: missing (the stored object is gone)"], 0
        except HyperSDKError as exc:
            if exc.retryable:
                raise
            return [_line(key, exc)], 0
        self.objects_read += 1
        problems: list[str] = []
        chunks = 0
        try:
            sizes = sorted({d.object_size for d in entries} - {reader.size})
            if sizes:
                problems.append(f"{key}: {reader.size} bytes stored, the manifest says {sizes[0]}")
            try:
                digest = _object_hash(reader)
            except HyperSDKError as exc:
                if exc.retryable:
                    raise
                return [*problems, _line(key, exc, reader.name)], 0
            for d in entries:
                lines, checked = self._check_chunks(key, d, reader)
                problems += lines
                chunks += checked
            if any(d.object_blake3 != digest for d in entries):
                problems.append(f"{key}: the stored bytes' BLAKE3 differs from the manifest's")
        finally:
            reader.close()
        return problems, chunks

    def _check_chunks(self, key: str, d: DiskManifest, reader: Any) -> tuple[list[str], int]:
        """Problems with ``d``'s guest bytes (a delta's header, every chunk hash), and how many
        chunk hashes were checked."""
        shown = f"{key} ({printable(d.member)})" if d.member else key
        plain = reader
        if d.encryption:
            if d.encryption.get("method") == "gpg":
                return [], 0  # no random access: its stored bytes are what can be checked
            if self._key is None:
                return [f"{shown}: encrypted: give its key to check its chunks"], 0
        try:
            if d.encryption:
                from hypersdk.crypto import DecryptingReader

                plain = DecryptingReader(reader, self._key)
            try:
                image = open_logical(d, plain)
                try:
                    if d.kind == "delta":
                        _check_header(d, image)
                    bad = _check_disk(image, d.chunks, d.kind == "delta")
                finally:
                    image.close()
            finally:
                if plain is not reader:
                    plain.close()
        except DecryptionError:
            return _container_problems(shown, reader, self._key), 0
        except HyperSDKError as exc:
            if exc.retryable:
                raise
            return [_line(shown, exc, reader.name)], 0
        what = [f"chunk at offset {offset}: hash mismatch" for offset in bad]
        return _named_lines(shown, what, "chunks differ"), len(d.chunks)


def _container_problems(shown: str, reader: Any, key: Any) -> list[str]:
    """Which chunks of an AES container fail authentication, by their offset in the stored
    object (docs/encryption.md): tampered bytes hide the guest offsets they held, this names
    where they are."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from hypersdk.crypto.container import (
        HEADER_SIZE,
        TAG,
        _nonce,
        parse_header,
        plaintext_layout,
        unwrap_key,
    )

    try:
        header = parse_header(reader.read(0, HEADER_SIZE), shown)
        aead = AESGCM(unwrap_key(header, key, shown))
        _, count = plaintext_layout(reader.size, header.chunk_size, shown)
    except DecryptionError as exc:
        return [_line(shown, exc)]
    step = header.chunk_size + TAG
    bad = []
    for i in range(count):
        start = HEADER_SIZE + i * step
        length = min(step, reader.size - start)
        try:
            aead.decrypt(
                _nonce(header.nonce_prefix, i, i == count - 1),
                reader.read(start, length),
                header.raw,
            )
        except InvalidTag:
            bad.append(
                f"encrypted chunk {i} at offset {start} (stored bytes {start}..{start + length}): "
                "fails authentication (tampered or corrupt)"
            )
    if not bad:  # every chunk authenticates: the failure was elsewhere (the header's key wrap)
        return [f"{shown}: cannot be decrypted"]
    return _named_lines(shown, bad, "encrypted chunks fail authentication")
