"""Running fedcustom jobs on a federated engine across processes and machines (today: Flower)."""
