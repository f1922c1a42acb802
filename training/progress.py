"""Progress for long steps (image decoding, feature extraction, export's conversions, accuracy checks
and int8 calibration, eval, data check).

On a terminal: a rich progress bar (rich comes with typer) that stays on screen when done. Anywhere
else (CI logs, pipes, `--json` runs): a line every EVERY_S seconds while a step runs (so a long one,
such as a minute of feature extraction, is seen to move) and one when it finishes, with its count
and seconds. Never both, so a log file holds no bar fragments and a terminal holds no duplicate lines.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

Log = Callable[[str], None]
EVERY_S = 5.0  # seconds between progress lines where there is no bar


def interactive() -> bool:
    return sys.stderr.isatty()


@contextmanager
def step(description: str, total: int | None, *, unit: str = "images", log: Log | None = None,
         bar: bool | None = None) -> Iterator[Callable[[int], None]]:
    """`with step("extracting features", n) as advance: ... advance(k)`. The bar (or the closing line)
    reports how many of `total` were done and how long it took; `bar=None` picks by terminal."""
    show_bar = interactive() if bar is None else bar
    start = time.perf_counter()
    done = 0
    if show_bar:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,  # noqa: PLC0415
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.console import Console  # noqa: PLC0415

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True), transient=False) as prog:
            task = prog.add_task(description, total=total)

            def advance(n: int = 1) -> None:
                prog.advance(task, n)

            yield advance
        return

    said = start

    def count(n: int = 1) -> None:
        nonlocal done, said
        done += n
        now = time.perf_counter()
        if now - said >= EVERY_S and (total is None or done < total):
            said = now
            of = f"/{total:,}" if total is not None else ""
            (log or _stderr)(f"{description}: {done:,}{of} {unit} so far ({now - start:.0f} s)")

    yield count
    seconds = time.perf_counter() - start
    if total is None and not done:  # a step with nothing to count (a conversion, a save): its time alone
        (log or _stderr)(f"{description}: done in {seconds:.1f} s")
        return
    of = f"/{total:,}" if total is not None and total != done else ""
    (log or _stderr)(f"{description}: {done:,}{of} {unit} in {seconds:.1f} s")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
