"""Models in other formats: ONNX graphs run by ONNX Runtime (`export.onnx`). The Hugging Face
layout is written by `pretrained` (export_hf and each family's exporter)."""
