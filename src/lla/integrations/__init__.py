"""Integrations with other libraries (imported on demand: ``lla.integrations.transformers``)."""
