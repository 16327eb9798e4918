"""HeriCap: hierarchical encoder-decoder image captioning on Ray.

The library (`hericap.config`, `hericap.data`, `hericap.models`, `hericap.evaluation`) imports
without Ray; only the layers that run things on Ray (`hericap.data.pipeline`,
`hericap.training.driver`, `hericap.training.loop`, tune, serve, the CLI) import it.
"""

__version__ = "0.1.0"
