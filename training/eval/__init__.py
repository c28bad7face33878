"""Evaluation of NeAR on the paper's four tasks: per-frame metrics, their aggregation over assets, the report."""
