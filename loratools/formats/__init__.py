"""On-disk adapter formats, one module each: :mod:`.peft` (spec v1), :mod:`.kohya`, :mod:`.diffusers`,
:mod:`.lycoris` (recognised and refused); :mod:`.registry` detects and dispatches.  No network here.
"""
