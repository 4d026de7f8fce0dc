"""worker.telemetry."""
