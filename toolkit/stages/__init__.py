"""The stages of a run, each a function from artefacts to a content-hashed artefact (`toolkit.artifacts`):

    tokens.py    images -> token cache (one frozen-backbone pass per split), or a live split
    probe.py     tokens -> linear probe on the CLS token (the baseline)
    probe_dinov2.py  tokens -> DINOv2's own linear evaluation (last blocks' CLS [+ mean patch]), the stronger baseline
    dense.py     tokens -> adapter + dense head, pooled train features, per-feature mean/std
    select.py    dense features -> A, R -> QPM selection and assignment, with a certificate
    finetune.py  dense model + selection -> the DINO-QPM model
    evaluate.py  a finished run -> interpretability metrics, explanations, report

A content-hashed stage is named after its module: the name is its artefact folder (`<cache.root>/<stage>/<key>`),
its entry in a run's manifest.json, its `--until` value and the module whose imports make its code fingerprint
(`toolkit.fingerprint`). `toolkit.pipeline` chains them. Stages compose the libraries below them and are imported
by nothing but the pipeline and the entry points.
"""
