"""ONNX export of a trained DINO-QPM run and torch-free ONNX Runtime deployment.

`python export/to_onnx.py --run RUN_DIR --out model.onnx` folds the frozen backbone, the adapter and the sparse head
into one graph (`export._build.export_run`); `python export/predict.py --model model.onnx --images ...` runs it
with onnxruntime, numpy and pillow only. Library modules (private, `_`-prefixed):
    _fold      BatchNorm -> Linear folding, pruning to the k selected channels, mean/std -> head bias
    _graph     the exported module (normalisation + ViT + folded adapter/head), the unfolded torch reference, dynamo
               export and the fp16 conversion
    _metadata  namespaced `metadata_props` and the before/after-folding size report
    _parity    the ONNX Runtime vs torch parity gate
    _quant     int8 quantisation (ONNX Runtime's quantiser) and the int8 vs fp32 fidelity gate
    _build     the orchestration behind the CLI
This package may import `toolkit`; `toolkit` never imports it.
"""
