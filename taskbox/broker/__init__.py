"""The AMQP side shared by relay and consumer: settings, topology and message format."""
