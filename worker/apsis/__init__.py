"""worker.apsis.client."""
