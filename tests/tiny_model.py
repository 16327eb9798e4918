"""The toy model sizes the Ray tests train, submit and serve: the demo model, shrunk."""

TINY_MODEL = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.grid_layers=1",
    "model.cap_generator.n_layers=1",
    "model.extractor.embed_dim=16",
]
