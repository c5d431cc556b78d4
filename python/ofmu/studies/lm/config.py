"""The authors benchmark's settings: :class:`LMConfig` and the presets (model rung x size).

``config_for(model, preset)`` starts from :class:`LMConfig`'s defaults, applies the model
rung's settings (``tiny``, ``small``, ``smollm2``) and then the size preset (``smoke``: CI,
seconds; ``power``: the real run). Everything is a plain field, so a run's JSON records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

# The methods of the default run; "OFMU-sign" (inner_preconditioner="sign") runs on request.
DEFAULT_METHODS = ("GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "OFMU", "OFMU-KL", "OFMU-paper",
                   "OFMU-beta0", "OFMU-rho")
MODELS = ("tiny", "small", "smollm2")
PRESET_NAMES = ("smoke", "power", "wide", "tofu")


@dataclass
class LMConfig:
    model: str = "tiny"
    preset: str = "power"
    forget: tuple = (1, 5, 10)
    seeds: tuple = (0, 1)  # unlearning seeds (minibatch order) of the test runs
    data_seeds: tuple = (0,)  # new authors, new base / target / retain models
    methods: tuple = DEFAULT_METHODS
    # data (the tiny rung's power size; TOFU's shape is 200 authors per pool, see the docs)
    n_test: int = 30
    n_val: int = 30
    n_holdout: int = 3
    qa_per_author: int = 20
    n_neighbour: int = 4
    n_perturbed: int = 3
    n_retain_eval: int = 40
    n_world: int = 0  # at most this many answered world facts (0: all)
    n_general: int = 80  # general sentences in the tiny base's pre-training (and replay)
    n_replay: int = 512  # general sentences the "-replay" methods replay (small, smollm2 rungs)
    n_fluency: int = 30  # held-out general sentences for the fluency perplexity
    general_words: int = 8  # longest general sentence, in words
    data_seed: int = 0  # the data seed being run (set per world by the runner)
    # tiny model and its training
    hidden: int = 64
    layers: int = 2
    base_epochs: int = 100
    base_lr: float = 1e-2
    ft_epochs: int = 20
    ft_lr: float = 3e-3
    ft_batch: int = 64
    replay_world: bool = True
    train_paraphrase: bool = True  # fine-tune on the paraphrased answer too (see docs)
    # unlearning
    budget: int = 80  # gradient evaluations of the longest run
    checkpoints: tuple = (0.25, 0.5, 1.0)  # fractions of the budget evaluated (validation)
    batch_size: int = 16
    eval_batch: int = 128
    lrs: tuple = (1e-4, 3e-4, 1e-3)  # every Adam-based method, OFMU's included
    sgd_lrs: tuple = (3e-3, 1e-2, 3e-2)  # OFMU's paper form (plain SGD steps)
    rho_probe: bool = False
    # runtime
    cache: str | None = None
    use_cache: bool = True
    device: str = "auto"
    gguf: str | None = None
    notes: list = field(default_factory=list)


MODEL_SETTINGS = {
    "tiny": {},
    # The small rung: SmolLM2's tokenizer and a few-million-parameter Llama pre-trained on
    # general text and world facts (models.load_small); fewer authors; fine-tuning replays the
    # world facts the base answers (without, the fine-tuned models answer none of them).
    # Its power run: forget 10%, budget 160, OFMU/NPO/GradDiff (about 100 CPU-minutes per data
    # seed on an AMD EPYC core: 27 for the target and retain models, ~5 per unlearning run).
    "small": dict(model="small", forget=(10,), n_test=20, n_val=20, n_holdout=2, n_general=0,
                  ft_epochs=6, ft_lr=1.5e-3, ft_batch=32, budget=160, methods=("OFMU", "NPO", "GradDiff"),
                  replay_world=True, eval_batch=64, lrs=(3e-5, 1e-4, 3e-4)),
    # SmolLM2-135M-Instruct at CPU size, full fine-tuning and rank-8 LoRA; on a GPU, raise n_test,
    # qa_per_author and the budget. Forget 10% only: at this size 1% would be one author's 4
    # questions, which no test can separate from the retain model (`--forget 1` still runs it).
    "smollm2": dict(model="smollm2", forget=(10,), n_test=20, n_val=20, n_holdout=2,
                    qa_per_author=4, n_neighbour=1, n_retain_eval=16, n_world=16, n_general=0,
                    n_fluency=16, ft_epochs=3, ft_lr=3e-4, ft_batch=16, replay_world=False, budget=24,
                    checkpoints=(1.0,), batch_size=8, eval_batch=32, lrs=(1e-5, 2e-5),
                    sgd_lrs=(1e-3, 2e-3), methods=("GA", "GradDiff", "NPO", "SimNPO", "OFMU", "OFMU-KL",
                                                   "NPO-lora", "OFMU-lora")),
}

# The power run of the tiny rung: on a loaded 2-core AMD EPYC the models of one data seed take
# about 3 min and, at budget 320, the ten default methods about 15 min per split, so the whole
# preset (3 data seeds, forget 1/5/10%) is about 2.5 hours of one core (docs/lm-benchmark.md);
# on a GPU raise n_test / n_val to TOFU's 200 authors (or use the wide preset) and the budget.
POWER = {
    "tiny": dict(data_seeds=(0, 1, 2), seeds=(0, 1), budget=320),  # 80 left OFMU mid-way
    "small": dict(data_seeds=(0, 1, 2), seeds=(0, 1)),
    "smollm2": dict(data_seeds=(0,), seeds=(0,)),
}
# TOFU's question counts at forget 5% and 10% on the tiny rung: 100 authors per pool (forget 5% =
# 5 authors = 100 questions, 10% = 200), a budget four times power's (the KS test over 200
# questions is stricter, and forgetting them takes longer). About 25-45 min of one core per data
# seed for the models and 10 min per method and split (docs/lm-benchmark.md).
WIDE = {"tiny": dict(n_test=100, n_val=100, forget=(5, 10), budget=1280, methods=("OFMU", "NPO"),
                     data_seeds=(0, 1, 2), seeds=(0, 1))}
# TOFU's shape on the tiny rung: 200 authors per pool, so that forget 1/5/10% hold 40/200/400
# questions. On a CPU run it one split at a time (`--forget 1`: about 45 min of one core per data
# seed); on a GPU, whole.
TOFU = {"tiny": {**WIDE["tiny"], "n_test": 200, "n_val": 200, "forget": (1, 5, 10)}}
SIZES = {"wide": WIDE, "tofu": TOFU}
SMOKE = dict(forget=(10,), n_test=10, n_val=10, n_holdout=1, qa_per_author=4, n_neighbour=1,
             n_retain_eval=8, n_world=8, n_general=8, n_fluency=4, general_words=8, hidden=32, layers=1,
             base_epochs=40, ft_epochs=10, budget=8, checkpoints=(0.5, 1.0), batch_size=4, eval_batch=32,
             lrs=(1e-3,), sgd_lrs=(1e-1,), data_seeds=(0,), seeds=(0,), rho_probe=False)


def config_for(model: str = "tiny", preset: str = "power", **overrides) -> LMConfig:
    """The settings of ``model`` at ``preset`` size, then ``overrides`` (names checked)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESET_NAMES}")
    known = {f.name for f in fields(LMConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown settings {bad}")
    if preset in SIZES and model not in SIZES[preset]:
        raise ValueError(f"the {preset} preset is defined for the {', '.join(SIZES[preset])} rung, "
                         f"not {model!r}")
    cfg = replace(LMConfig(), **MODEL_SETTINGS[model], preset=preset)
    cfg = replace(cfg, **(SMOKE if preset == "smoke" else SIZES[preset][model] if preset in SIZES
                          else POWER[model]))
    return replace(cfg, **overrides)
