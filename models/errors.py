"""One rooted exception tree for the whole fleet.

The worker's task wrapper (``worker.tasks``) is the single place that turns these into a decision:

* ``TicketRejected``   -> dead-letter at once, never retried (the input itself is bad).
* ``TransientError``   -> retried with exponential backoff, dead-lettered after the attempt cap.
* anything else        -> counted as a failed attempt, dead-lettered after the attempt cap.
* ``ModelUnavailable`` -> raised at boot only; the worker refuses to start and never consumes.
"""


class ThinfleetError(Exception):
    """Root of every error thinfleet raises on purpose."""


class TicketRejected(ThinfleetError):
    """The ticket is invalid (empty, oversized, malformed); retrying cannot help."""


class ModelUnavailable(ThinfleetError):
    """The model is missing, corrupt, mismatched or unreachable; the worker must not start."""


class TransientError(ThinfleetError):
    """A passing failure (Redis or S3 briefly unreachable); worth retrying with backoff."""


class AttemptsExhausted(ThinfleetError):
    """A ticket's attempts ran out without one finishing (it crashed or hung its worker)."""


class TaxonomyError(ThinfleetError):
    """The taxonomy file is missing or does not validate."""
