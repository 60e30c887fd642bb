"""What differs between LoRA variants, as objects a layer holds per adapter (variants/lora.py says
the protocol): plain LoRA, DoRA; and the other variant pieces: the PiSSA / OLoRA initialisations
(principal.py), LoftQ init (loftq.py) and AdaLoRA's config and SVD form (adalora.py)."""
