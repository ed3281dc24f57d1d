"""Image commands: ``hyperctl convert``, ``hyperctl info``, ``hyperctl check`` (engine only, no Prefect).

Engine modules load inside each command, so ``--help`` and usage errors stay instant.

An image's backing file (a qcow2 delta's base) or extent files (a VMDK descriptor's) must lie in
the image's own directory, or be a repository chain (hypersdk.references); ``--allow-backing-
outside`` lets them reach anywhere, for images the user trusts. Text that comes from an image
(names, descriptor fields, problems) is printed with its control characters escaped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from hypersdk.cli.common import byte_counter, parse_options, progress_bar

if TYPE_CHECKING:
    from hypersdk.formats.base import DiskImage
    from hypersdk.references import ReferencePolicy

F = TypeVar("F", bound=Callable[..., Any])


def allow_backing_outside(f: F) -> F:
    """The ``--allow-backing-outside`` flag (the command gets ``allow_backing_outside``)."""
    return click.option(
        "--allow-backing-outside",
        is_flag=True,
        help="Follow backing and extent files outside the image's directory (trusted images "
        "only: a hostile image could name any file on this machine)",
    )(f)


def _policy(allow_outside: bool) -> ReferencePolicy | None:
    from hypersdk.references import ReferencePolicy

    return ReferencePolicy(allow_outside=True) if allow_outside else None


def _open(src: str, input_format: str | None, allow_outside: bool) -> DiskImage:
    """A local image file, or an image URL a source declares (``ebs://REGION/SNAPSHOT``):
    guest bytes, opened as raw (never probed as a container) unless ``-f`` says otherwise."""
    from hypersdk.formats import get_driver, open_image

    reader = None
    if "://" in src:  # only then the providers (pydantic, SDKs): a local convert stays light
        from providers import open_image_url

        reader = open_image_url(src)
    if reader is None:
        return open_image(src, input_format, _policy(allow_outside))
    try:
        return get_driver(input_format or "raw").open(reader)
    except BaseException:
        reader.close()
        raise


def _shown(value: Any) -> Any:
    """``value`` with control characters escaped in every string (names come from images)."""
    from hypersdk.references import printable

    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value


@click.command(help="Convert a disk image to another format, natively (no qemu-img).")
@click.argument("src", help="Source image")
@click.argument("dst", help="Output image (written atomically)")
@click.option("-O", "--output-format", default="qcow2", help="Output format")
@click.option("-f", "--format", "input_format", help="Input format (default: probed)")
@click.option("-o", "--option", multiple=True, help="Format option key=value")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars")
@click.option(
    "-t",
    "--cache",
    default="none",
    help="Output cache mode, as qemu-img's -t: none (O_DIRECT + fsync, the default), "
    "writeback (page cache + fsync) or unsafe (page cache, no fsync: qemu-img's default)",
)
@allow_backing_outside
def convert(
    src: str,
    dst: str,
    output_format: str,
    input_format: str | None,
    option: tuple[str, ...],
    quiet: bool,
    cache: str,
    allow_backing_outside: bool,
) -> None:
    from hypersdk.convert import convert_image
    from hypersdk.formats import output_driver

    options = parse_options(option)
    output_driver(output_format).check_options(options)
    with (
        _open(src, input_format, allow_backing_outside) as image,
        progress_bar(not quiet and sys.stderr.isatty()) as bar,
    ):
        scan = byte_counter(bar, "scan", image.extents().defined_bytes if bar else None)
        write = byte_counter(bar, "convert", None)
        result = convert_image(
            image, dst, output_format, options, progress=write, scan_progress=scan, cache=cache
        )
    if not quiet:
        from hypersdk.units import human

        click.echo(
            f"{src} ({image.format}) -> {dst} ({output_format}): {human(result.output_bytes)} written, "
            f"{human(result.data_bytes)} of data in {result.seconds:.2f} s "
            f"({result.virtual_size / max(result.seconds, 1e-9) / 1e6:,.0f} MB/s of disk)"
        )


def _describe(img: DiskImage, filename: str) -> dict:
    """One image of a chain as ``info`` shows it: its own allocation, never its base's."""
    return {
        "filename": filename,
        "format": img.format,
        "virtual_size": img.virtual_size,
        "allocated_bytes": img.own_extents().defined_bytes,
        **img.info(),
    }


def _text(data: dict) -> list[str]:
    from hypersdk.units import human

    size, allocated = data["virtual_size"], data["allocated_bytes"]
    lines = [
        f"image: {data['filename']}",
        f"format: {data['format']}",
        f"virtual size: {human(size)} ({size} bytes)",
        f"allocated: {human(allocated)} ({allocated} bytes)",
    ]
    skip = ("filename", "format", "virtual_size", "allocated_bytes", "backing_chain")
    lines += [
        f"{k.replace('_', ' ')}: {v}" for k, v in data.items() if k not in skip and v is not None
    ]
    return lines


@click.command(help="Show an image's format, virtual size and allocation.")
@click.argument("image", help="Image file")
@click.option("-f", "--format", "input_format")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
@allow_backing_outside
def info(image: str, input_format: str | None, as_json: bool, allow_backing_outside: bool) -> None:
    """Like ``qemu-img info --backing-chain``: 'allocated' counts what each image itself holds
    (a delta's own clusters, not its base's), and each backing image follows as its own entry
    (text: blocks after a blank line; JSON: the list ``backing_chain``)."""
    with _open(image, input_format, allow_backing_outside) as img:
        data = _describe(img, image)
        chain = []
        base = img.backing
        while base is not None:
            chain.append(_describe(base, base.name))
            base = base.backing
        if chain:
            data["backing_chain"] = chain
    data = _shown(data)
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    blocks = [_text(data)] + [_text(d) for d in data.get("backing_chain", [])]
    click.echo("\n\n".join("\n".join(b) for b in blocks))


@click.command(
    help="Check an image's metadata and data for consistency (non-zero exit on problems)."
)
@click.argument("image", help="Image file")
@click.option("-f", "--format", "input_format")
@allow_backing_outside
def check(image: str, input_format: str | None, allow_backing_outside: bool) -> None:
    """Metadata as qemu-img check sees it, and every allocated cluster or grain read (a corrupt
    compressed cluster is a problem here, while qemu-img check never reads data)."""
    from hypersdk.errors import FormatError
    from hypersdk.formats import open_image

    with open_image(image, input_format, _policy(allow_backing_outside)) as img:
        problems = img.check()
    if problems:
        for p in problems:
            click.echo(f"{click.style('problem:', fg='red')} {_shown(p)}")
        raise FormatError(image, f"{len(problems)} problem(s) found")
    click.echo(f"{image}: no errors found ({img.format})")


def register(group: click.Group) -> None:
    for cmd in (convert, info, check):
        group.add_command(cmd)
