"""``python -m sdtp_core.bench``: see :mod:`sdtp_core.bench.latency`."""

from sdtp_core.bench.latency import main

main()
