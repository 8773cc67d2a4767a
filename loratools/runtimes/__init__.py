"""Runtime profiles: how vLLM, SGLang, llama.cpp, diffusers, kohya, ComfyUI and PEFT apply an adapter's files.

One module per runtime (data: its scale rule, what it ignores and refuses, the keys it reads, the
source each rule was read from), :mod:`.registry` by name, and :mod:`.check`: per-module factors,
the problems ``validate --for`` reports, and :func:`~.check.conform`, the output convention.
"""
