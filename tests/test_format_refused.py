"""Formats recognised but not read are refused by name by ``hyperctl info`` and ``convert``
(exit 1, one line), never converted as raw container bytes; ``-f raw`` still reads such bytes
when they are a raw disk's own data, and naming the format is refused the same way."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hypersdk.cli.main import main
from tests import qemu

KiB = 1024


def _made(tmp_path: Path, fmt: str, *opts: str) -> bytes:
    """An image qemu-img creates itself, for the formats it can write."""
    path = tmp_path / f"made.{fmt}"
    res = qemu.run("create", "-f", fmt, *opts, str(path), "1M")
    assert res.returncode == 0, res.stderr
    return path.read_bytes()


def _bochs() -> bytes:
    head = bytearray(512)
    head[0:23] = b"Bochs Virtual HD Image\0"
    head[32:40] = b"Redolog\0"
    head[48:56] = b"Growing\0"
    struct.pack_into("<I", head, 64, 0x00020000)
    return bytes(head)


def _dmg() -> bytes:
    tail = bytearray(512)
    struct.pack_into(">4sII", tail, 0, b"koly", 4, 512)
    return bytes(64 * KiB) + bytes(tail)


SAMPLES = {
    "sesparse": (lambda _t: struct.pack("<QQ", 0xCAFEBABE, 0x200000001), "seSparse extent"),
    "qcow": (lambda t: _made(t, "qcow"), "QCOW version 1"),
    "qed": (lambda t: _made(t, "qed"), "QED image"),
    "luks": (
        lambda t: _made(
            t, "luks", "--object", "secret,id=s,data=pw", "-o", "key-secret=s,iter-time=10"
        ),
        "LUKS encrypted volume",
    ),
    "bochs": (lambda _t: _bochs(), "Bochs growing image"),
    "cloop": (
        lambda _t: (
            b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 "
            b"/dev/cloop $1\n\0\0\0\0"
        ),
        "cloop compressed image",
    ),
    "dmg": (lambda _t: _dmg(), "Apple disk image"),
    "gzip": (lambda _t: b"\x1f\x8b\x08\0\0\0\0\0\0\3", "gzip-compressed"),
    "xz": (lambda _t: b"\xfd7zXZ\0\0\4", "xz-compressed"),
    "zstd": (lambda _t: b"\x28\xb5\x2f\xfd\x24\x00", "zstd-compressed"),
    "bzip2": (lambda _t: b"BZh91AY&SY" + bytes(20), "bzip2-compressed"),
}


def hyperctl(capsys, *args: object) -> tuple[int, list[str]]:
    """``hyperctl ARGS`` in this process: its exit code and its stderr lines."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_refused_by_name(tmp_path, capsys, fmt):
    make, words = SAMPLES[fmt]
    img = tmp_path / f"image.{fmt}"
    data = make(tmp_path)
    img.write_bytes(data.ljust(64 * KiB, b"\0") if fmt != "dmg" else data)
    out = tmp_path / "out.raw"
    for args in (("info", img), ("convert", "-q", "-O", "raw", img, out)):
        code, [line] = hyperctl(capsys, *args)
        assert code == 1 and line.startswith(f"error: {img}: "), line
        assert words in line and "not read here" in line and "-f raw" in line, line
    assert not out.exists()
    # named, it is refused the same way (no file name: the format is the problem)
    code, [line] = hyperctl(capsys, "info", "-f", fmt, img)
    assert code == 1 and line.startswith(f"error: format {fmt!r} is") and words in line, line
    # a raw disk whose data starts like this is still a raw disk when the user says so
    assert hyperctl(capsys, "convert", "-q", "-f", "raw", "-O", "raw", img, out) == (0, [])
    assert out.read_bytes() == img.read_bytes()
