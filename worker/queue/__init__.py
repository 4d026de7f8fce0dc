"""worker.queue."""
