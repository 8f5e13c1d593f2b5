"""Processes and services: the embedded stack (Redis, Kafka), the Flink cluster, job supervision."""
