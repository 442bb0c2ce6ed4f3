"""Jobs: command lines and the runs that compose stages (main job, sweeps, probe, toy trainers)."""
