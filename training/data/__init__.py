"""Data: the sources --data names (synthetic, cifar10, folder), their splits and tf.data pipelines."""
