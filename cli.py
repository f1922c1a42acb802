"""The `tlserve` command line: options in, tables out; the work lives in training/ and serving/."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import training  # noqa: F401  (sets TensorFlow's environment before anything imports it)
import typer
from rich.console import Console
from rich.table import Table

from training.errors import UserError

app = typer.Typer(
    name="tlserve",
    help="Train, compare, export, serve and benchmark transfer-learning image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

RunsDir = Annotated[Optional[Path], typer.Option("--runs-dir", help="Where runs live (default: $TLSERVE_HOME/runs or ./runs).")]
ModelsDir = Annotated[Optional[Path], typer.Option("--models-dir", help="Where exported models live (default: $TLSERVE_HOME/models or ./models).")]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


# ---- training (issue 2) ----------------------------------------------------------------

# ---- export / predict / models (issue 3) -----------------------------------------------

# ---- serve / build (issue 4) -----------------------------------------------------------

# ---- compare / bench / features (issue 5) ----------------------------------------------


def main() -> None:
    """Console-script entry point: a user's mistake is one line and exit 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        raise SystemExit(_report(str(exc))) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        err.print("aborted")
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click  # noqa: PLC0415

        if isinstance(exc, click.ClickException):
            exc.show()
            raise SystemExit(2) from None
        raise


def _report(message: str) -> int:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return 2


if __name__ == "__main__":
    main()
