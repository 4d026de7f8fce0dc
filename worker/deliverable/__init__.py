"""The deliverable: what a data subject's export becomes in object storage.

``export_file`` (streaming split of a downloaded export into profiles), ``report`` (the
readable report), ``package`` (the zip a DPO hands over: report, JSON, CSV, checksums),
``manifest`` (the commit point, written last), ``storage`` (obstore,
local or cloud), ``envelope`` (client-side encryption), ``csv_cells`` (CSV cells a
spreadsheet cannot run as formulas).

May import: ``worker.model``, ``worker.telemetry``, ``worker.config``, ``worker.errors``.
Independent of ``worker.apsis``.
"""
