"""Datasets, shards, vocabulary and image transforms.

Everything here imports without Ray except :mod:`hericap.data.pipeline`, the Ray Data layer.
"""
