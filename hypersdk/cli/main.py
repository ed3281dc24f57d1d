"""``hyperctl``: the command line. Each module in this package with ``register(group)`` adds its
commands, so a new command group is one new module.

Plain click (no typer, no rich at start-up): ``hyperctl convert`` is timed against qemu-img, so
the CLI's own start-up must stay small. Commands import their engine modules when they run.
Errors from the engine (HyperSDKError) end as one red line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

# Before Prefect is imported by any command: no analytics from a CLI run, and Prefect's own
# console output only when asked for (HYPERSDK_VERBOSE=1). Runs still send every log line to
# the Prefect API (the UI's run logs); the terminal gets our summary, our warnings, and a
# failure as one line.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
if os.environ.get("HYPERSDK_VERBOSE") != "1":
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import click

from hypersdk import cancel
from hypersdk.cli.common import Group
from hypersdk.errors import HyperSDKError, Interrupted

app = Group(
    name="hyperctl",
    help="Export, back up and migrate VMs across hypervisors and clouds.",
    no_args_is_help=True,
    context_settings={"show_default": True},
)


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


def _fail(label: str, message: str) -> None:
    """One line on stderr; click strips the colour when stderr is not a terminal."""
    click.echo(f"{click.style(label, fg='red')} {message}".rstrip(), err=True)


def main(argv: list[str] | None = None) -> int:
    cancel.stop_on_sigterm()  # SIGTERM stops a command as Ctrl-C does (docs/cancel.md)
    try:
        # Without standalone mode click returns exit codes and raises errors for us to print.
        code = app.main(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C: 130, SIGTERM: 143
        _fail("interrupted:", cancel.left_behind())
        return cancel.exit_code()
    except HyperSDKError as exc:
        _fail("error:", str(exc))
        return exc.exit_code
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C (and EOF at a prompt) inside a command into Abort
        if isinstance(exc.__cause__, KeyboardInterrupt):
            _fail("interrupted:", cancel.left_behind())
            return cancel.exit_code()
        _fail("aborted", "")
        return 1
    except click.exceptions.ClickException as exc:  # usage errors: click's message, exit 2
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        click.echo(exc.code, err=True)
        return 1
    except Exception as exc:  # a bug of ours: still one line, the traceback only when asked
        if os.environ.get("HYPERSDK_VERBOSE") == "1":
            raise
        if type(exc).__module__.startswith("pydantic"):  # a value out of its bounds
            first = exc.errors()[0]  # type: ignore[attr-defined]
            where = ".".join(str(p) for p in first["loc"]) or "value"
            _fail("error:", f"invalid {where}: {first['msg']}")
            return 2
        _fail("internal error:", f"{type(exc).__name__}: {exc} (HYPERSDK_VERBOSE=1 shows where)")
        return 70
    return 0


def run() -> None:
    """The ``hyperctl`` command: ``main``, then a quick exit after a flow run.

    After a run, the interpreter's own shutdown (tearing down Prefect's thousand modules and its
    loop threads) costs 0.7-0.9 s here, a sixth of a short run. Once Prefect's log and event
    workers have delivered everything to the API, nothing is left to do: the process ends at
    once. Not in Prefect's ephemeral mode, where the exit also stops the temporary server."""
    code = main()
    if "prefect" in sys.modules and os.environ.get("PREFECT_API_URL"):
        try:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
        except Exception:  # the normal exit drains what is left
            sys.exit(code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
