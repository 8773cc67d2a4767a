"""Quantized base checkpoints: one codec per storage format, and the registry that finds them.

See :mod:`loratools.io.quant.base` for the codec contract.
"""
