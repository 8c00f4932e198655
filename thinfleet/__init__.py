"""thinfleet: fleets of thin agents (small fine-tuned, quantized LLMs) routing support tickets.

The flow is the layout: ``producer/`` -> Redis -> ``worker/`` -> results stream, with the shared
contract in ``models/``. This package holds what spans them: the ``thinfleet`` CLI and the local
dev stack used by the demo and the tests.
"""

__version__ = "0.1.0"
