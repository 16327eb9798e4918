"""HeriCap: hierarchical encoder-decoder image captioning on Ray.

Layers, lowest first; a module imports only from its own layer or the ones below
(``tests/test_imports.py`` walks the package and checks it):

1. ``hericap.config`` (and ``hericap.log``): the schema, presets and overrides.
2. ``hericap.data``: readers, shards, storage locations, vocabulary, transforms.
3. ``hericap.models``: the captioner, its builder and weight loading.
4. ``hericap.checkpoint``: checkpoint folders (save, load, import).
5. ``hericap.evaluation``: metrics, reports, captioning a batch with a checkpoint.
6. The Ray layer: ``hericap.runtime`` (cluster, Ray Data, batch evaluation), then
   ``hericap.training`` and ``hericap.serve``, then ``hericap.tune``.
7. ``hericap.cli`` (and ``jobs/``).

Only the Ray layer and the CLI import Ray.
"""

__version__ = "0.1.0"
