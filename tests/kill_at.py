"""Run `tlserve ARGS...` and SIGKILL it at one named point of training (for the resume tests).

    python tests/kill_at.py POINT -- train ...

POINT is one of
  batch:N          after the N-th training batch of the process (mid-epoch)
  checkpoint:NAME  right after checkpoint NAME is written, before the state names it
  phase-end:NAME   right after phase NAME is recorded as done
  state:N          right after the state naming N finished epochs is written (before anything else sees the epoch)
  evaluate         when the test evaluation starts (after the last epoch)
  save             after the model file is written, before the run folder is renamed into place
"""
from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    import cli

    _arm(point)
    cli.main(args)


def _arm(point: str) -> None:
    """Patch the code so that this process dies at `point` (KIND:ARG)."""
    kind, _, arg = point.partition(":")
    from serving.base import storage
    from training.fit import checkpoints, run_state, train
    from training.env import keras

    K = keras()
    if kind == "batch":
        seen = [0]

        class Killer(K.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                seen[0] += 1
                if seen[0] == int(arg):
                    _die()

        fit = K.Model.fit

        def fit_and_die(self, *a, callbacks=None, **kw):
            return fit(self, *a, callbacks=[*(callbacks or []), Killer()], **kw)

        K.Model.fit = fit_and_die
    elif kind == "checkpoint":
        write = checkpoints.Checkpoints.write

        def write_and_die(self, name, **objects):
            ref = write(self, name, **objects)
            if name == arg:
                _die()
            return ref

        checkpoints.Checkpoints.write = write_and_die
    elif kind in ("phase-end", "state"):
        write_json = storage.write_json

        def reached(state: dict) -> bool:  # phase-end:PHASE once PHASE is done, state:N after epoch N
            return arg in state.get("phases_done", []) if kind == "phase-end" else len(state.get("history", [])) == int(arg)

        def write_state_and_die(path, data):
            write_json(path, data)
            if path.name == run_state.STATE and reached(data):
                _die()

        storage.write_json = write_state_and_die
    elif kind == "evaluate":
        train.evaluate = lambda *a, **kw: _die()
    elif kind == "save":
        promote = storage.promote

        def promote_or_die(staging, final, **kw):
            if not str(final).endswith(".partial"):  # the finished run, not the new run's own folder
                _die()
            return promote(staging, final, **kw)

        storage.promote = promote_or_die
    else:
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    main()
