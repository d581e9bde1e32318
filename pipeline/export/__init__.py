"""Exports of a run's shards into other ecosystems' dataset formats (``hero-export``)."""
