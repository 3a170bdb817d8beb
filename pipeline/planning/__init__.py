"""`--dry-run`: what a setting costs before a cluster is booked. Imports go one way: the memory model (memory.py) <-
the ZeRO-3 gather trace (gathers.py) <- the collective cost model (collectives.py) <- the performance plan
(report.py) <- `dry_run` (dry_run.py), the entry."""

from pipeline.planning.dry_run import dry_run

__all__ = ["dry_run"]
