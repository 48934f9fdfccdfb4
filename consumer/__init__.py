"""The consumer: claims delivered tasks, runs their handlers, commits outcomes, then acks."""
