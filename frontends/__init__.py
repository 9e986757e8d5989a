"""Frontends: PyTorch modules (``torch.fx``) and ONNX files (onnx2torch) to canonical graphs."""

from certfx.frontends.load import load

__all__ = ["load"]
