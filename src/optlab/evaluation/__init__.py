"""Evaluation: metrics from predictions, the evaluate stage's work and the plot stage's figures."""
