"""``hyperctl``: the command line. Each module in this package with ``register(app)`` adds its
commands, so a new command group is one new module.

Errors from the engine (HyperSDKError) end as one red line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

# Before Prefect is imported by any command: no analytics from a CLI run, and Prefect's own
# logs on the terminal only when asked for (HYPERSDK_VERBOSE=1 or PREFECT_LOGGING_LEVEL set by the user).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
if os.environ.get("HYPERSDK_VERBOSE") != "1":
    # Failures reach the user as our one-line error; the run keeps its full logs in Prefect.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")

import typer
from rich.console import Console

from hypersdk.errors import HyperSDKError

app = typer.Typer(
    name="hyperctl",
    help="Export, back up and migrate VMs across hypervisors and clouds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)


def _register_all() -> None:
    from hypersdk import cli

    for mod in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        if mod.name in ("main", "common") or mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"hypersdk.cli.{mod.name}")
        register = getattr(module, "register", None)
        if register:
            register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode typer returns exit codes (130 for Ctrl-C) instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            return code
    except HyperSDKError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[red]interrupted:[/red] nothing was published under a final name")
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            err.print("[red]aborted[/red]")
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
