"""worker.flow."""
