"""The base of the Ray layer: starting or joining a cluster, Ray Data datasets over the shards,
Ray tasks, and batch evaluation of a checkpoint (Ray Data batch inference).

Training (:mod:`hericap.training`), serving (:mod:`hericap.serve`) and sweeps
(:mod:`hericap.tune`) build on this package; nothing below it imports Ray.
"""
