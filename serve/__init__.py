"""Explainable predictions as a service: a Ray Serve application speaking the Open Inference Protocol.

`dinoqpm-serve --model model.onnx` (serve/cli.py) serves an ONNX graph written by export/to_onnx.py on this machine;
`serve run serve.app:build model=...` or a config like serve/cluster.yaml serves it on a Ray cluster. Modules:
    protocol  the Open Inference Protocol's requests, responses and errors on bytes and arrays (no Ray, no HTTP)
    model     one model opened for serving: session, signature, metadata, the image endpoint's logic (no Ray)
    page      the upload page
    app       the Ray Serve deployment and its FastAPI routes (thin: bytes in, `protocol`/`model`, bytes out)
    cli       dinoqpm-serve
Torch-free: it imports export/predict.py's session, preprocessing, explanation and drawing, nothing from toolkit.
See docs/serving.md.
"""
