"""``lvvit.serving``: ``lvvit-serve``, an MLServer runtime for lvvit-export folders.

cli (entry point) -> settings (MLServer's settings files) -> MLServer with rest (binary
tensors, size limit) -> runtime (the ``MLModel``) -> protocol (V2 tensors <-> rows, request
checks) + preprocess (image bytes) -> batcher -> engine (ONNX Runtime). model_dir reads the
export folder; metrics adds batch histograms; triton_ext adds Triton's conventions to
MLServer's servers (the v2 error shape on REST, the model-configuration extension).
"""
