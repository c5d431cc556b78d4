"""Does Adam make the stationarity penalty's effect independent of rho?

The outer OFMU direction is ``d = g_r + 2 rho h`` with ``h ~ H_f u``. With plain steps the
penalty's share grows with rho. Adam divides every coordinate by the root of its running mean
square, so once ``|2 rho h_i| >> |g_r_i|`` (a model fine-tuned to convergence on the retain set
has ``g_r ~ 0``) the step is ``~ h / rms(h)`` whatever rho is: rho then switches the penalty on
rather than weighting it. This probe measures, at the target model, on fixed val batches:

* ``|g_r|``, ``|2 rho h|`` and ``cos(d, h)`` for a range of rho (the SGD view);
* Adam's first step ``d / (|d| + eps)`` (bias-corrected moments, per coordinate): its cosine with
  the rho = 1 step and the share of coordinates whose sign follows ``h`` (the Adam view);
* and the end point of short OFMU-Adam runs with each rho (same budget of steps, not of
  gradient evaluations, so that only rho changes): forget probability and model utility.
"""

from __future__ import annotations

import copy

import torch

from . import evaluate
from .data import AuthorData
from .methods import Context, ofmu
from .text import PairStream, collate, encode_all
from .world import Streams, eval_sets, metrics_row, qa_items

RHOS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def first_step(target, forget_pairs, retain_pairs, pad_id: int, device, n: int = 32,
               rhos=RHOS) -> list[dict]:
    model = copy.deepcopy(target).train()
    params = [p for p in model.parameters() if p.requires_grad]
    bf = {k: v.to(device) for k, v in collate(forget_pairs[:n], pad_id).items()}
    br = {k: v.to(device) for k, v in collate(retain_pairs[:n], pad_id).items()}
    gf = torch.autograd.grad(model(**bf).loss, params, create_graph=True)
    gr = _flat(torch.autograd.grad(model(**br).loss, params)).double()
    gf_flat = _flat([g.detach() for g in gf]).double()
    u = gf_flat - (gf_flat @ gr) / (gr @ gr) * gr  # project, beta = 1
    pieces, i = [], 0
    for p in params:
        pieces.append(u[i:i + p.numel()].view_as(p).to(p.dtype))
        i += p.numel()
    h = _flat(torch.autograd.grad(gf, params, grad_outputs=pieces)).double()
    rows = []
    ref = None
    for rho in sorted(rhos, reverse=True):
        d = gr + 2 * rho * h
        adam = d / (d.abs() + 1e-8)
        if ref is None:
            ref = adam
        rows.append({"rho": rho, "retain_grad_norm": float(gr.norm()),
                     "penalty_norm": float((2 * rho * h).norm()),
                     "cos_d_h": float(d @ h / (d.norm() * h.norm())),
                     "adam_cos_to_rho_max": float(adam @ ref / (adam.norm() * ref.norm())),
                     "adam_sign_follows_h": float(((torch.sign(d) == torch.sign(h)).double()).mean())})
    return sorted(rows, key=lambda r: r["rho"])


def rho_probe(w, pct, device) -> dict:
    """The first-step probe and short OFMU-Adam runs for each rho on the val pool of ``pct``
    (the shipped defaults otherwise; same number of steps for every rho)."""
    cfg, tok = w.cfg, w.tok
    forget_qas, _ = w.data.split("val", pct)
    forget_pairs = encode_all(tok, qa_items(AuthorData.qas(forget_qas)))
    retain_pairs = w.retain_pairs(pct)
    out = {"first_step": first_step(w.target, forget_pairs, retain_pairs, tok.pad_id, device), "runs": []}
    sets = eval_sets(w, "val", pct)
    lr = cfg.lrs[len(cfg.lrs) // 2]
    steps = max(1, cfg.budget // 8)
    for rho in RHOS:
        model = copy.deepcopy(w.target).train()
        torch.manual_seed(0)
        streams = Streams(PairStream(forget_pairs, cfg.batch_size, tok.pad_id, 1, device),
                          PairStream(retain_pairs, cfg.batch_size, tok.pad_id, 2, device))
        ofmu(model, Context(), {"lr": lr, "rho": rho, "retain": "nll"}, streams, steps)
        raw = evaluate.raw(model.eval(), tok, sets, cfg.eval_batch, device, mia=False)
        row = metrics_row(raw, raw)  # FQ relative to itself is meaningless: keep the others
        out["runs"].append({"rho": rho, "steps": steps, **{k: row[k] for k in (
            "forget_prob", "forget_tr", "forget_rouge", "model_utility", "retain_prob")}})
    return out
