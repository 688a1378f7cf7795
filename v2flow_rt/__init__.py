"""v2flow-rt: V2Flow from a trained PyTorch checkpoint to fast ONNX / TensorRT inference."""

__version__ = "0.1.0"
