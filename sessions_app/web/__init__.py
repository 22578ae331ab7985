"""The web view: JSON stats, Prometheus metrics, heap snapshots and the dashboard."""
