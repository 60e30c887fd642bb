"""What differs between LoRA variants, as objects a layer holds per adapter: plain LoRA, DoRA,
the PiSSA / OLoRA initialisations, AdaLoRA's SVD form and config."""
