"""Exports of a served model: ``lmforge export-onnx MODEL OUT_DIR`` (``onnx.py``)."""

from lmforge.serving.export.onnx import OnnxExport, export_onnx

__all__ = ["OnnxExport", "export_onnx"]
