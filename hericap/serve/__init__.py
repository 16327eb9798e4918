"""Ray Serve HTTP captioning endpoint for a checkpoint (planned).

It will host :class:`hericap.evaluation.inference.CaptionPredictor` behind a FastAPI ingress
with ``@serve.batch`` dynamic batching.
"""
