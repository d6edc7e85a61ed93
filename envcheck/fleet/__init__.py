"""Run gpu-smoke on every node of a cluster through its own engine (Slurm, Kubernetes) and
aggregate the per-node reports into one fleet table."""
