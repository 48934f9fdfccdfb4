"""The outbox relay: moves outbox rows to RabbitMQ and flips their tasks NEW -> PENDING."""
