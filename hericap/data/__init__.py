"""Datasets, shards, vocabulary and image transforms (no Ray: the Ray Data datasets over the
shards are :mod:`hericap.runtime.datasets`)."""
