"""Everything that loads an exported model and answers requests: the base layer, which a bento ships.

It never imports TensorFlow nor training/ (tests/test_boundaries.py checks both); dependencies run
one way, cli.py -> training/ -> serving/. TensorFlow's environment is training.env's concern.
"""
