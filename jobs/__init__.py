"""Ray job entrypoints: one file per job, run as ``python -m jobs.<verb_noun>``."""
