"""A throw-away two-node Slurm cluster for the tests (see slurm_cluster.py, fixtures.py)."""
