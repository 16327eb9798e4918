"""The captioning endpoint: upload checks and batch captioning (``images``, ``service``; no
Ray), and the Ray Serve application with its FastAPI ingress (``app``, ``server``)."""
