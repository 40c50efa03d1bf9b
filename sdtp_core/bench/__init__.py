"""Measurement: prefill/decoding latency (:mod:`.latency`, ``python -m sdtp_core.bench``), where the time
goes (:mod:`.breakdown`), FLOPs accounting (:mod:`.flops`), the machine record (:mod:`.machine`) and how well
a pruner's scores match the saliency on held-out data (:mod:`.quality`)."""
