"""The contract between the producer and the worker.

Everything both sides must agree on lives here and nowhere else: the ticket event, the routed
result and the dead-letter entry (``schemas``), the taxonomy (``taxonomy``), the exception tree
(``errors``), and every Redis key, queue, stream and default (``keys``).
"""

from models.errors import (
    ModelUnavailable,
    ThinfleetError,
    TicketRejected,
    TransientError,
)
from models.schemas import DeadLetterEntry, ModelRef, RoutedResult, TicketEvent, Timings
from models.taxonomy import Taxonomy, load_taxonomy

__all__ = [
    "DeadLetterEntry",
    "ModelRef",
    "ModelUnavailable",
    "RoutedResult",
    "Taxonomy",
    "ThinfleetError",
    "TicketEvent",
    "TicketRejected",
    "Timings",
    "TransientError",
    "load_taxonomy",
]
