"""Test infrastructure: private real brokers (Redis, RabbitMQ) and a counting TCP proxy."""
