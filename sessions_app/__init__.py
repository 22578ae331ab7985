"""sessions-app: reassemble fragmented session data from Kafka with bounded memory."""

__version__ = "0.1.0"
