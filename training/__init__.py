"""Everything up to a trained Keras model, its run record, and its exports.

Importing this package sets the environment TensorFlow reads at import time
(tf-keras as the Keras, quiet C++ logging) but imports nothing heavy itself.
"""
from training import env as _env

_env.configure_environment()
