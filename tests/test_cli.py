"""hyperctl as a user runs it: real subprocesses, exit codes, one-line errors, atomic outputs."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypersdk.imagegen import write_realistic_disk
from providers.sources.local import create_vm
from tests import qemu
from tests.cli_run import HYPERCTL, hyperctl, one_line_error

MiB = 1024 * 1024


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "disk.raw"
    write_realistic_disk(path, 20 * MiB + 777, seed=5)
    return path


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_info_check(image, tmp_path, fmt, qemu_img):
    out = tmp_path / f"out.{fmt}"
    res = hyperctl("convert", image, out, "-O", fmt)
    assert res.returncode == 0, res.stderr
    qemu.compare(image, out, "raw", fmt)
    if fmt == "qcow2":
        qemu.check(out, "qcow2")
    info = json.loads(hyperctl("info", out, "--json").stdout)
    size = 20 * MiB + 777
    # qcow2 (like qemu) stores whole 512-byte sectors: the tail reads as zeros
    assert info["format"] == fmt and info["virtual_size"] == (
        size if fmt == "raw" else -(-size // 512) * 512
    )
    assert 0 < info["allocated_bytes"] <= info["virtual_size"]
    res = hyperctl("check", out)
    assert res.returncode == 0 and "no errors" in res.stdout


def test_convert_bad_input(image, tmp_path):
    wrong_format = hyperctl("convert", image, tmp_path / "x", "-O", "vhdz")
    one_line_error(wrong_format, "unknown format 'vhdz'")
    assert wrong_format.returncode == 2  # a usage mistake
    one_line_error(
        hyperctl("convert", tmp_path / "missing.img", tmp_path / "x", "-O", "raw"), "missing.img"
    )
    one_line_error(
        hyperctl("convert", image, tmp_path / "x", "-O", "raw", "-o", "nonsense"), "key=value"
    )
    one_line_error(
        hyperctl("convert", image, tmp_path / "x", "-O", "qcow2", "-o", "bogus=1"),
        "no option bogus",
    )
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    one_line_error(hyperctl("info", bad), str(bad))
    # a value past a model's bounds is a usage error, not a pydantic traceback
    res = hyperctl("decrypt", image, tmp_path / "x", "--key-file", "k" * 5000)
    one_line_error(res, "invalid ref", "4096")
    assert res.returncode == 2
    assert not (tmp_path / "x").exists()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, 2 * MiB))


def test_full_target_disk_leaves_nothing(image, tmp_path):
    out = tmp_path / "full.qcow2"
    one_line_error(
        hyperctl("convert", image, out, "-O", "qcow2", preexec_fn=_limit_file_size), "no space"
    )
    assert not out.exists() and not leftovers(tmp_path)


def test_interrupted_convert_leaves_nothing(tmp_path):
    big = tmp_path / "big.raw"
    write_realistic_disk(big, 256 * MiB, seed=9, random_fraction=0.7, text_fraction=0.2)
    out = tmp_path / "big.qcow2"
    proc = subprocess.Popen(
        [HYPERCTL, "convert", str(big), str(out), "-O", "qcow2", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that started us in the background may have ignored SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "convert finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


def test_vms_list_and_missing_source(tmp_path):
    root = tmp_path / "vms"
    create_vm(root, "vm-a", {"disk0": MiB})
    res = hyperctl("vms", "list", "--source", f"local://{root}", "--json")
    assert res.returncode == 0, res.stderr
    assert [v["name"] for v in json.loads(res.stdout)] == ["vm-a"]
    one_line_error(
        hyperctl("vms", "list", "--source", f"local://{tmp_path / 'nope'}"), "does not exist"
    )
    one_line_error(hyperctl("vms", "list", "--source", "nosuch://x"), "unknown source scheme")


def test_migrate_cli_against_server(prefect_server, tmp_path, qemu_img):
    _, env = prefect_server
    env = {**env, "HYPERSDK_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_LOGGING_LEVEL")  # the user's default: our one-line errors only
    root = tmp_path / "vms"
    vm_dir = create_vm(root, "vm-b", {"disk0": 6 * MiB})
    write_realistic_disk(vm_dir / "disk0.img", 6 * MiB, seed=3)
    target = tmp_path / "exports"
    res = hyperctl("migrate", "vm-b", "--source", root, "--target", target, env=env)
    assert res.returncode == 0, res.stderr
    assert "Full export of VM 'vm-b'" in res.stdout and "verified" in res.stdout
    (out,) = target.glob("vm-b/*/disk0.qcow2")
    qemu.compare(vm_dir / "disk0.img", out, "raw", "qcow2")
    # missing VM, unreadable disk, full target: one line each, nothing published
    one_line_error(
        hyperctl("migrate", "ghost", "--source", root, "--target", target, env=env), "ghost"
    )
    os.unlink(vm_dir / "disk0.img")
    one_line_error(
        hyperctl("migrate", "vm-b", "--source", root, "--target", target, env=env), "disk0"
    )
    write_realistic_disk(vm_dir / "disk0.img", 6 * MiB, seed=4)
    res = hyperctl(
        "migrate",
        "vm-b",
        "--source",
        root,
        "--target",
        tmp_path / "small",
        "--full",
        env=env,
        preexec_fn=_limit_file_size,
    )
    one_line_error(res, "no space")
    assert not list((tmp_path / "small").rglob("*.qcow2")) and not list(
        (tmp_path / "small").rglob("*.partial-*")
    )


_LIGHT_CHECK = """
import sys
from hypersdk.cli.main import main
code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {
    "typer", "pydantic", "rich", "prefect", "httpx", "boto3"})
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


def test_cli_start_up_stays_light(tmp_path):
    """``hyperctl convert`` is timed against qemu-img: neither --help nor a quiet, piped convert
    may load typer, pydantic, rich, Prefect or the cloud SDKs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}

    def child(*args):
        res = subprocess.run(
            [sys.executable, "-c", _LIGHT_CHECK, *map(str, args)],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout

    out = child("convert", "--help")
    assert "--output-format" in out and "Source image" in out
    assert "HEAVY=\n" in out, out
    src = tmp_path / "small.raw"
    write_realistic_disk(src, 2 * MiB, seed=1)
    out = child("convert", "-t", "unsafe", src, tmp_path / "small.qcow2")  # stderr: a pipe
    assert "small.qcow2 (qcow2)" in out and "HEAVY=\n" in out, out
    qemu.compare(src, tmp_path / "small.qcow2", "raw", "qcow2")
