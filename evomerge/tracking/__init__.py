"""Optuna recording, the dashboard launcher and plots."""
