"""vSphere data path against vcsim: full and incremental export (qemu-img is the oracle), counted
HTTP bytes, parallel ranged reads, resume after a cut connection, server gone, OVF via ExportVm."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from hypersdk.atomic import atomic_file
from hypersdk.convert import convert_stream
from hypersdk.errors import EndpointUnreachableError, SourceError, VMNotFoundError
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from providers import open_source
from tests import qemu
from tests.fixtures.vcsim import reconfigure, snapshot_names

MiB = 1024 * 1024
BS = 64 * 1024


def _export(src, snap, changes, path, fmt="qcow2", options=None):
    """Stream the snapshot's disk through the Source interface into ``path``; HTTP body bytes."""
    reader = src.open_disk(snap, snap.disks[0].disk)
    try:
        with atomic_file(path) as sink:
            convert_stream(reader, fmt, sink, changes.extents, options)
        return reader.bytes_fetched
    finally:
        reader.close()


def test_full_then_incremental_qcow2(vcsim, tmp_path, qemu_img):
    vm = "DC0_H0_VM1"
    size = 16 * MiB
    reconfigure(vcsim, vm, disk_size=size)
    flat = vcsim.flat_file(vm)
    write_realistic_disk(flat, size, seed=3)
    with open_source(vcsim.source_url(), **vcsim.options()) as src:
        src.enable_cbt(vm)
        with src.snapshot(vm) as snap:
            full = src.changed_extents(snap, snap.disks[0].disk, None)
            assert not full.incremental and full.change_id == snap.disks[0].change_id
            assert 0 < full.extents.data_bytes < size  # allocated (non-zero) areas only
            moved = _export(src, snap, full, tmp_path / "base.qcow2")
        assert moved == full.extents.data_bytes
        qemu.check(tmp_path / "base.qcow2", "qcow2")
        qemu.compare(flat, tmp_path / "base.qcow2", "raw", "qcow2")
        shutil.copyfile(flat, tmp_path / "v1.raw")

        changed = mutate_disk(flat, 6, seed=9)
        with src.snapshot(vm) as snap2:
            delta = src.changed_extents(snap2, snap2.disks[0].disk, full.change_id)
            assert delta.incremental and delta.since == full.change_id
            assert delta.change_id == snap2.disks[0].change_id != full.change_id
            assert [e.offset for e in delta.extents] == _runs(changed)
            opts = {"backing_file": "base.qcow2", "backing_format": "qcow2"}
            moved = _export(src, snap2, delta, tmp_path / "delta.qcow2", options=opts)
            # only the changed extents crossed the wire
            assert moved == delta.extents.data_bytes == len(changed) * BS
            # a change id the server rejects: full map and a note, never less data
            reset = src.changed_extents(snap2, snap2.disks[0].disk, "52 00 bogus/1")
            assert not reset.incremental and "rejected" in reset.note
            assert reset.extents.data_bytes >= full.extents.data_bytes
        qemu.check(tmp_path / "delta.qcow2", "qcow2")
        qemu.compare(flat, tmp_path / "delta.qcow2", "raw", "qcow2")  # base + delta == new disk
        assert snapshot_names(vcsim, vm) == []


def _runs(offsets: list[int]) -> list[int]:
    """Start offsets of the merged runs of 64 KiB blocks at ``offsets``."""
    ordered = sorted(offsets)
    return [off for i, off in enumerate(ordered) if i == 0 or ordered[i - 1] + BS != off]


def test_parallel_ranges_and_progress(vcsim):
    vm = "DC0_H0_VM0"
    reconfigure(vcsim, vm, disk_size=8 * MiB)
    data = bytes(range(256)) * (6 * MiB // 256)  # shorter than the disk: the rest reads as zeros
    vcsim.flat_file(vm).write_bytes(data)
    done = []
    with (
        open_source(vcsim.source_url(), **vcsim.options(workers=4)) as src,
        src.snapshot(vm) as snap,
    ):
        reader = src.open_disk(snap, snap.disks[0].disk, progress=done.append)
        try:
            assert reader.size == 8 * MiB and reader.file_size == 6 * MiB
            assert reader.read(0, 4 * MiB) == data[: 4 * MiB]
            assert reader.requests == 4  # one 4 MiB read -> 4 parallel ranged GETs
            tail = reader.read(5 * MiB, 3 * MiB)
            assert tail == data[5 * MiB :] + bytes(2 * MiB)
            assert reader.bytes_fetched == 5 * MiB and sum(done) == 5 * MiB
            assert reader.meter.rate > 0
            with pytest.raises(ValueError):
                reader.read(8 * MiB - 1, 2)
        finally:
            reader.close()


class CuttingProxy:
    """TCP proxy on 127.0.0.1 that can cut connections mid-body or vanish altogether."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.cuts_left = 0
        self.cut_after = 0
        self.cuts = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, cuts: int, after: int) -> None:
        self.cuts_left, self.cut_after = cuts, after

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
                sent += len(chunk)
                if downstream and self.cuts_left > 0 and sent > self.cut_after:
                    with self._lock:
                        if self.cuts_left > 0:
                            self.cuts_left -= 1
                            self.cuts += 1
                            raise OSError("cut")
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def test_cut_connection_resumes_then_server_gone(vcsim):
    vm = "DC0_C0_RP0_VM0"
    reconfigure(vcsim, vm, disk_size=8 * MiB)
    payload = hashlib.shake_256(b"vsphere").digest(8 * MiB)
    vcsim.flat_file(vm).write_bytes(payload)
    proxy = CuttingProxy((vcsim.host, vcsim.port))
    try:
        url = f"vsphere://127.0.0.1:{proxy.port}"
        with open_source(url, **vcsim.options(workers=2, attempts=3)) as src:
            snap = src.create_snapshot(vm)
            try:
                reader = src.open_disk(snap, snap.disks[0].disk)
                try:
                    proxy.arm(cuts=3, after=300 * 1024)  # mid-body of the 2 MiB pieces
                    got = b"".join(reader.read(o, 4 * MiB) for o in range(0, 8 * MiB, 4 * MiB))
                    assert got == payload
                    assert proxy.cuts == 3 and reader.resumes >= 3
                    # each broken piece resumed from its last byte: nothing fetched twice
                    assert reader.bytes_fetched == 8 * MiB
                    proxy.close()  # the server goes away for good
                    started = time.monotonic()
                    with pytest.raises(EndpointUnreachableError, match="attempts"):
                        reader.read(0, MiB)
                    assert time.monotonic() - started < 10
                finally:
                    reader.close()
                with pytest.raises(EndpointUnreachableError, match="lost the connection"):
                    src.remove_snapshot(snap)
            finally:  # the flow's retry reaches the server again (here: directly)
                with open_source(vcsim.source_url(), **vcsim.options()) as direct:
                    direct.remove_snapshot(snap)
        assert snapshot_names(vcsim, vm) == []
    finally:
        proxy.close()


def test_export_ovf_lease(vcsim, tmp_path):
    vm = "DC0_C0_RP0_VM1"
    reconfigure(vcsim, vm, disk_size=2 * MiB, power="on")
    content = hashlib.shake_256(b"ovf").digest(2 * MiB)
    vcsim.flat_file(vm).write_bytes(content)
    with open_source(vcsim.source_url(), **vcsim.options()) as src:
        with pytest.raises(SourceError, match="powered off"):
            src.export_ovf(vm, tmp_path / "on")
        with pytest.raises(VMNotFoundError):
            src.export_ovf("ghost", tmp_path / "ghost")
        reconfigure(vcsim, vm, power="off")

        def slow(n: int) -> None:
            time.sleep(0.1)  # a slow network: the keeper must report while data moves

        out = src.export_ovf(vm, tmp_path / "ovf", keepalive=0.02, progress=slow)
        assert out["keepalive_reports"] >= 2
        (disk,) = out["disks"]
        assert Path(disk).read_bytes() == content
        ovf = Path(out["ovf"]).read_text()
        assert 'ovf:capacity="2097152"' in ovf and vm in ovf
        mf = Path(out["manifest"]).read_text()
        assert f"= {hashlib.sha256(content).hexdigest()}" in mf

        def boom(n: int) -> None:
            raise RuntimeError("injected failure")

        with pytest.raises(RuntimeError, match="injected"):
            src.export_ovf(vm, tmp_path / "failed", progress=boom)
        assert not list((tmp_path / "failed").iterdir())  # nothing half-written
    reconfigure(vcsim, vm, power="on")


def test_export_ova_from_snapshot(vcsim, tmp_path, qemu_img):
    import tarfile

    vm = "DC0_C0_RP0_VM1"
    size = 6 * MiB
    reconfigure(vcsim, vm, disk_size=size, power="on")  # a running VM: snapshot based
    flat = vcsim.flat_file(vm)
    write_realistic_disk(flat, size, seed=8)
    ova = tmp_path / "vm.ova"
    with open_source(vcsim.source_url(), **vcsim.options()) as src:
        src.enable_cbt(vm)  # so only allocated areas are read ('*')
        out = src.export_ova(vm, ova)
    assert out["size"] == ova.stat().st_size
    # two passes over the allocated data (size+hash, then emit), nothing else
    data = sum(e.length for e in _allocated(flat))
    assert out["bytes_fetched"] == 2 * data, (out, data)
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        assert names[0].endswith(".ovf") and names[1].endswith(".mf")
        (disk_name,) = [n for n in names if n.endswith(".vmdk")]
        tar.extract(disk_name, tmp_path, filter="data")
    qemu.compare(flat, tmp_path / disk_name, "raw", "vmdk")
    assert snapshot_names(vcsim, vm) == []


def _allocated(path):
    """The 64 KiB blocks of ``path`` holding non-zero bytes (what CBT '*' reports in vcsim)."""
    from hypersdk.blockmap import nonzero_extents

    data = path.read_bytes()
    return list(nonzero_extents(data, 0, BS))
