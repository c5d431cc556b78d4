"""Unlearning evidence: runs of OFMU and the baselines under one budget protocol, and their
evaluation against a retrained model. Split by domain so neither drowns the other:

* :mod:`ofmu.studies.methods`: the methods (OFMU and the baselines) and their budget accounting;
* :mod:`ofmu.studies.vision`: Fashion-MNIST / digits data, MLPs, UA / RA / TA / MIA metrics;
* :mod:`ofmu.studies.lm`: fictitious-author QA data, tiny Llama / SmolLM2, TOFU metrics.

Nothing here is needed to use the optimizer; the CLI (``ofmu demo``, ``ofmu benchmark``) and
the benchmark scripts call into it.
"""
