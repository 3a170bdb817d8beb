"""`--dry-run`: what a setting costs before a cluster is booked; `python -m pipeline.planning predict`: the same
step-time model for any dense decoder. Imports go one way: the memory model (memory.py) <- the GPU facts
(hardware.py) <- the ZeRO-3 gather trace (gathers.py) <- the collective cost model (collectives.py) <- the step-time
model (step_time.py) <- a generic decoder (decoder.py) and the performance plan (report.py) <- a measured step
(measured.py) and `dry_run` (dry_run.py), the entries, with __main__.py."""

from pipeline.planning.dry_run import dry_run, write_run_config

__all__ = ["dry_run", "write_run_config"]
