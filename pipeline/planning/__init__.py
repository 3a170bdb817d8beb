"""`--dry-run`: what a setting costs before a cluster is booked. The memory model (memory.py), the ZeRO-3 gather
trace (gathers.py), the collective cost model (collectives.py) and the performance plan's table (report.py), joined
by `dry_run`."""
