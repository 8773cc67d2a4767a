"""Fused CPU loops, compiled by numba: one pass over a row block where eager torch makes ten.

Eager torch on the CPU runs each elementwise operation as its own pass over memory.  The FP8
requantization of a row block (decode, scale, amax, clamp, round to e4m3, decode again, two norms)
and a TIES join (trim, vote, elect, agree, disjoint mean) are a dozen such passes; as compiled
loops they read each input once.  Every loop here performs the same IEEE float32 operations, in
the same order, as the torch expressions it replaces (no fast-math, no reassociation), so results
are bit-identical; only the survival norms, reports, are summed in another order (in float64).

Each function is compiled on first use and cached on disk (numba's ``cache=True``), and releases
the GIL, so the merge's thread pool runs row blocks side by side.  numba is imported only when one
of the loop modules is, by the merge paths that use them.  The FP8 loops (``e4m3_loops``) are
called through ``e4m3``, which links them from a cached image of their machine code
(:mod:`loratools.fused.native`) without importing numba at all: 0.1 s instead of 0.85 s per process.
"""
