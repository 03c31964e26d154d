"""The platform benchmarks of the cluster issue, on this machine's CPUs: what orchestration (Prefect,
Ray Train, MLflow) costs the training stage (``overhead``), and how fast tokenized shards are read
from an object store through the read cache against local disk (``storage``)."""
