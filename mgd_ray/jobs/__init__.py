"""Training procedures, one file each: CPS teachers, MGD students, baselines."""
