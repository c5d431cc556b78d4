"""Unlearning metrics (UA, RA, TA, MIA-Efficacy, Avg. Gap, wall time) and result reports."""

from .metrics import (
    METRICS,
    accuracy,
    avg_gap,
    evaluate,
    mia_efficacy,
    mia_efficacy_from_scores,
    predict_proba,
    true_label_prob,
    wall_timer,
)
from .report import aggregate, markdown_table, plot_tradeoff, write_outputs

__all__ = [
    "METRICS",
    "accuracy",
    "aggregate",
    "markdown_table",
    "plot_tradeoff",
    "write_outputs",
    "avg_gap",
    "evaluate",
    "mia_efficacy",
    "mia_efficacy_from_scores",
    "predict_proba",
    "true_label_prob",
    "wall_timer",
]
