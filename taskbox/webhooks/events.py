"""The events a webhook can carry, and the channel the enqueue trigger notifies.

Both are written out in migration 0009 too (its trigger maps the terminal statuses to
these names): a migration must not change when the code does.
"""

from __future__ import annotations

# One per terminal status: DONE, FAILED, CANCELLED.
EVENTS: tuple[str, ...] = ("task.done", "task.failed", "task.cancelled")

# NOTIFY channel of the trigger that enqueues deliveries, and of a replay: a wake-up
# hint for the delivery workers, which poll as well. Channels are per database.
WEBHOOK_CHANNEL = "taskbox_webhooks"
