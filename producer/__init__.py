"""The producer side: the library a ticketing system imports, and backfills.

    from producer import Producer
    producer = Producer()                      # ProducerSettings from THINFLEET_* variables
    receipt = producer.submit({"ticket_id": "T-1", "text": "My card has not arrived"})
"""

from producer.client import Producer, Receipt
from producer.settings import ProducerSettings

__all__ = ["Producer", "ProducerSettings", "Receipt"]
