"""Image-classification unlearning: offline datasets and splits, MLPs (original and retrained,
cached), the metrics (UA, RA, TA, MIA-Efficacy, Avg. Gap) and the study runner."""

from .images import (
    FASHION_MNIST_CLASSES,
    DatasetMissingError,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
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
from .models import RECIPES, Recipe, make_mlp, original_model, retrained_model, train_model
from .report import aggregate, markdown_table, plot_tradeoff, write_outputs
from .splits import DATASETS, SCENARIOS, Split, UnlearningData, make_unlearning_data

__all__ = [
    "DATASETS", "FASHION_MNIST_CLASSES", "METRICS", "RECIPES", "SCENARIOS",
    "DatasetMissingError", "Recipe", "Split", "UnlearningData",
    "accuracy", "aggregate", "avg_gap", "evaluate", "load_digits", "load_fashion_mnist",
    "make_mlp", "make_unlearning_data", "markdown_table", "mia_efficacy",
    "mia_efficacy_from_scores", "original_model", "plot_tradeoff", "predict_proba", "read_idx",
    "retrained_model", "train_model", "true_label_prob", "wall_timer", "write_outputs",
]
