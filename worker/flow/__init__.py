"""The flow: the steps that move a job from request to stored export, and batches of them.

``runtime`` (the clients one process uses), ``pipeline`` (request, callback, fetch, store,
fail), ``feeder`` (the dispatch machinery: each request leaves at a slot reserved for it),
``batches`` (creating, cancelling and finalizing a batch), ``batch_file`` (reading a batch
file), ``consumer`` (the inbox consumer thread),
``watchdog`` (the periodic safety net), ``retention`` (deleting what has expired),
``delivery`` (the package built with each job, and expiring links to it).

May import: ``worker.apsis``, ``worker.deliverable``, ``worker.model`` and below. Never
Celery or Flask: tasks are sent by name through a dispatch function it is given.
"""
