"""Errors of training alone; UserError itself, the one type for a user's mistake, is serving.errors."""
from serving.errors import UserError


class Interrupted(UserError):
    """Training stopped by the user (Ctrl-C) after some epochs; the run can be resumed."""

    exit_code = 130
