"""The build DAG and the `near` CLI."""
