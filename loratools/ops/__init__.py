"""Operations on adapters that need no base checkpoint to be written: arithmetic in factored form
(:mod:`.arith`), comparison (:mod:`.diff`), spectra (:mod:`.spectrum`), summaries (:mod:`.summary`),
and extraction of a LoRA from two checkpoints (:mod:`.extract`).  Each returns new values; inputs
are never changed.
"""
