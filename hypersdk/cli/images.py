"""Image commands: ``hyperctl convert``, ``hyperctl info``, ``hyperctl check`` (engine only, no Prefect).

Engine modules load inside each command, so ``--help`` and usage errors stay instant."""

from __future__ import annotations

import json
import sys

import click

from hypersdk.cli.common import byte_counter, parse_options, progress_bar


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
def convert(
    src: str,
    dst: str,
    output_format: str,
    input_format: str | None,
    option: tuple[str, ...],
    quiet: bool,
    cache: str,
) -> None:
    from hypersdk.convert import convert_image
    from hypersdk.formats import get_driver, open_image

    options = parse_options(option)
    get_driver(output_format).check_options(options)
    with (
        open_image(src, input_format) as image,
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


@click.command(help="Show an image's format, virtual size and allocation.")
@click.argument("image", help="Image file")
@click.option("-f", "--format", "input_format")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
def info(image: str, input_format: str | None, as_json: bool) -> None:
    from hypersdk.formats import open_image
    from hypersdk.units import human

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
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    click.echo(
        f"image: {image}\nformat: {data['format']}\n"
        f"virtual size: {human(img.virtual_size)} ({img.virtual_size} bytes)\n"
        f"allocated: {human(allocated)}"
    )
    for key, value in data.items():
        if key not in ("filename", "format", "virtual_size", "allocated_bytes"):
            click.echo(f"{key.replace('_', ' ')}: {value}")


@click.command(help="Check an image's metadata for consistency (non-zero exit on problems).")
@click.argument("image", help="Image file")
@click.option("-f", "--format", "input_format")
def check(image: str, input_format: str | None) -> None:
    from hypersdk.errors import FormatError
    from hypersdk.formats import open_image

    with open_image(image, input_format) as img:
        problems = img.check()
    if problems:
        for p in problems:
            click.echo(f"{click.style('problem:', fg='red')} {p}")
        raise FormatError(image, f"{len(problems)} problem(s) found")
    click.echo(f"{image}: no errors found ({img.format})")


def register(group: click.Group) -> None:
    for cmd in (convert, info, check):
        group.add_command(cmd)
