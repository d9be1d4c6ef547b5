"""Evaluation: per-case segmentation metrics, reports, and scoring of mask folders."""
