"""Everything that loads an exported model and answers requests; never imports TensorFlow at import time."""
from training import env as _env

_env.configure_environment()
