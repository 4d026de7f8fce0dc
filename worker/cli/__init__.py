"""The command line (``apsis-export``) and the local stack it can start.

``commands`` is the CLI; ``demo`` runs one export end to end; ``stack`` starts a sandbox,
Redis, webhook and worker on this machine; ``embedded`` finds or starts a Redis. The top
layer: it may import everything beneath it.
"""

from worker.cli.commands import main

__all__ = ["main"]
