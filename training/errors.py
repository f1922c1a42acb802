"""Errors of training alone; UserError itself, the one type for a user's mistake, is serving.base.errors."""
from serving.base.errors import UserError


class Interrupted(UserError):
    """Training stopped by the user (Ctrl-C) after some epochs; the run can be resumed."""

    exit_code = 130


class ClusterLost(UserError):
    """A multi-worker run lost a worker: TensorFlow aborts the collectives on every survivor, and the
    run continues only when all workers are started again."""

    # Over 128: Kubeflow's restartPolicy ExitCode restarts such exits (1-127 are permanent failures).
    exit_code = 138


def reason(exc: BaseException) -> str:
    """A library's exception as the end of an error line: its whole message on one line, never cut
    short (a download failure's reason comes last, after the URL), else the exception's type."""
    return " ".join(str(exc).split()) or exc.__class__.__name__
