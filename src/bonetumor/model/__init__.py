"""Models and their checkpoints: backbones with the classification head, the checkpoint format, ONNX export."""
