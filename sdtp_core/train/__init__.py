"""SDTP training. Stage 1 saliency (:mod:`.saliency`), Stage 2 pruner training (:mod:`.stage2`, on the
masked forward of :mod:`.masked_forward` with the losses of :mod:`.losses`), the fast cached-feature fit
(:mod:`.fit`), the data (:mod:`.data`), settings (:mod:`.config`) and the entry point (:mod:`.run`,
``python -m sdtp_core.train``)."""
