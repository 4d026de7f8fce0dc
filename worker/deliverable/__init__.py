"""worker.deliverable."""
