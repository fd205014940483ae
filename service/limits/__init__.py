"""Limits: named downstreams with their own RPM, processor and slots; and the settings
every process of a deployment shares."""
