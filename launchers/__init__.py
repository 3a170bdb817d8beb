"""Entry points: deepspeed launchers per stage, Slurm scripts, export. Nothing imports these."""
