"""Image commands: ``hyperctl convert``, ``hyperctl info``, ``hyperctl check`` (engine only, no Prefect)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from hypersdk.cli.common import byte_counter, parse_options, progress_bar
from hypersdk.errors import FormatError
from hypersdk.formats import get_driver, open_image
from hypersdk.units import human

out = Console(soft_wrap=True)


def convert(
    src: Annotated[str, typer.Argument(help="Source image")],
    dst: Annotated[str, typer.Argument(help="Output image (written atomically)")],
    output_format: Annotated[
        str, typer.Option("-O", "--output-format", help="Output format")
    ] = "qcow2",
    input_format: Annotated[
        str | None, typer.Option("-f", "--format", help="Input format (default: probed)")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("-o", "--option", help="Format option key=value")
    ] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars")] = False,
    cache: Annotated[
        str,
        typer.Option(
            "-t",
            "--cache",
            help="Output cache mode, as qemu-img's -t: none (O_DIRECT + fsync, the default), "
            "writeback (page cache + fsync) or unsafe (page cache, no fsync: qemu-img's default)",
        ),
    ] = "none",
) -> None:
    """Convert a disk image to another format, natively (no qemu-img)."""
    from hypersdk.convert import convert_image

    options = parse_options(option)
    get_driver(output_format).check_options(options)
    with (
        open_image(src, input_format) as image,
        progress_bar(not quiet and sys.stderr.isatty()) as bar,
    ):
        scan = byte_counter(bar, "scan", image.extents().defined_bytes)
        write = byte_counter(bar, "convert", None)
        result = convert_image(
            image, dst, output_format, options, progress=write, scan_progress=scan, cache=cache
        )
    if not quiet:
        out.print(
            f"{src} ({image.format}) -> {dst} ({output_format}): {human(result.output_bytes)} written, "
            f"{human(result.data_bytes)} of data in {result.seconds:.2f} s "
            f"({result.virtual_size / max(result.seconds, 1e-9) / 1e6:,.0f} MB/s of disk)",
            highlight=False,
        )


def info(
    image: Annotated[str, typer.Argument(help="Image file")],
    input_format: Annotated[str | None, typer.Option("-f", "--format")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show an image's format, virtual size and allocation."""
    with open_image(image, input_format) as img:
        allocated = img.extents().defined_bytes
        data = {
            "filename": image,
            "format": img.format,
            "virtual_size": img.virtual_size,
            "allocated_bytes": allocated,
            **img.info(),
        }
    if as_json:
        out.print_json(json.dumps(data))
        return
    out.print(
        f"image: {image}\nformat: {data['format']}\n"
        f"virtual size: {human(img.virtual_size)} ({img.virtual_size} bytes)\n"
        f"allocated: {human(allocated)}",
        highlight=False,
    )
    for key, value in data.items():
        if key not in ("filename", "format", "virtual_size", "allocated_bytes"):
            out.print(f"{key.replace('_', ' ')}: {value}", highlight=False)


def check(
    image: Annotated[str, typer.Argument(help="Image file")],
    input_format: Annotated[str | None, typer.Option("-f", "--format")] = None,
) -> None:
    """Check an image's metadata for consistency (non-zero exit on problems)."""
    with open_image(image, input_format) as img:
        problems = img.check()
    if problems:
        for p in problems:
            out.print(f"[red]problem:[/red] {p}", highlight=False)
        raise FormatError(image, f"{len(problems)} problem(s) found")
    out.print(f"{image}: no errors found ({img.format})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(info)
    app.command()(check)
