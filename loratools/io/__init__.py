"""Bytes in and out: safetensors headers and writers, atomic outputs, the direct-I/O sink, the
streaming pipeline, base checkpoints, and adapter files fetched from the Hub into its cache.

Nothing here knows what a LoRA is: this layer moves tensors and files, safely and in bounded memory.
"""
