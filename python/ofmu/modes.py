"""OFMU's modes as data: one record per ``similarity`` and ``outer_hvp`` mode.

The optimizer picks the two records once, at construction, and every decision that depends on
a mode (which gradient graphs a backward pass keeps, whether a double backward is needed, how
many gradient evaluations a step costs) reads them instead of comparing strings. The formulas
behind each mode are in ``docs/design.md`` ("Modes").
"""

from __future__ import annotations

from dataclasses import dataclass

# A forward pass alone, in gradient evaluations (forward + backward of one minibatch).
FORWARD_COST = 1 / 3


@dataclass(frozen=True)
class SimilarityMode:
    """How the ``-beta * cos(g_f, g_r)`` term enters the ascent direction ``u = g_f + gamma*y``."""

    name: str
    second_order: bool  # y = grad(cos) = H_f a + H_r b: the graphs of g_f, g_r, a double backward
    projects: bool  # y = g_r, gamma = -beta * <g_f, g_r> / |g_r|^2 (the projection)
    cost: int  # gradient evaluations to form u from one closure call
    summary: str
    beta_max: float | None = None  # the largest meaningful beta (None: no bound)

    @property
    def has_operand(self) -> bool:
        """False: ``u = g_f`` (no ``y`` term)."""
        return self.second_order or self.projects


@dataclass(frozen=True)
class OuterHvpMode:
    """How ``h ~ Hessian(Phi) v`` of the outer penalty ``rho * |grad Phi|^2`` is obtained."""

    name: str
    penalised: bool  # False: h = 0 and the outer step is plain retain descent
    needs_graph_f: bool  # h differentiates through g_f
    needs_graph_r: bool  # ... and through g_r (only where u depends on g_r)
    h_cost: float  # gradient evaluations of one h (on top of forming v) ...
    h_cost_per_u: int  # ... plus this many evaluations of u (finite differences)
    rank_local: bool  # h differentiates through each rank's own gradients: no averaging
    summary: str

    def graphs(self, sim: SimilarityMode) -> tuple[bool, bool]:
        """Which gradient graphs the outer evaluation keeps: ``(graph_f, graph_r)``."""
        return (sim.second_order or self.needs_graph_f,
                sim.second_order or (self.needs_graph_r and sim.has_operand))

    def double_backward(self, sim: SimilarityMode) -> bool:
        """Whether the outer step differentiates through a gradient (fails on SDPA attention)."""
        return self.penalised and any(self.graphs(sim))

    def cost(self, sim: SimilarityMode) -> float:
        """Gradient evaluations of one ``h`` on top of forming ``v``."""
        return self.h_cost + self.h_cost_per_u * sim.cost


SIMILARITY = {
    "project": SimilarityMode("project", False, True, 2,
                              "u = g_f - beta*(<g_f,g_r>/|g_r|^2)*g_r (first order)",
                              beta_max=1.0),  # beta = 1 already removes the retain component
    "hvp": SimilarityMode("hvp", True, False, 3,
                          "u = g_f - beta*grad(cos), grad(cos) = H_f a + H_r b (one double backward)"),
    "none": SimilarityMode("none", False, False, 2, "u = g_f (plain gradient ascent)"),
}

OUTER_HVP = {
    "forget": OuterHvpMode("forget", True, True, False, 1, 0, False,
                           "h = H_f v (one double backward of L_f)"),
    "exact": OuterHvpMode("exact", True, True, True, 2, 0, True, "h = J_u^T v by autograd through u"),
    "fd": OuterHvpMode("fd", True, False, False, 0, 2, False,
                       "h = (u(theta+d*v/|v|) - u(theta-d*v/|v|))*|v|/(2d) (two more closures)"),
    "none": OuterHvpMode("none", False, False, False, 0, 0, False, "h = 0 (retain descent only)"),
}


def double_backward_graphs(sim: SimilarityMode, hvp: OuterHvpMode, inner: bool,
                           penalty_on: bool) -> tuple[bool, bool, str]:
    """The gradient graphs ``(graph_f, graph_r)`` a step's double backward passes go through,
    and the modes that need them (for the error message): the inner loop's with
    ``similarity="hvp"``, the outer one's with the penalty on. ``(False, False, "")``: first
    order throughout."""
    graph_f = graph_r = False
    why = []
    if inner and sim.second_order:
        graph_f = graph_r = True
        why.append(f"similarity={sim.name!r}")
    if penalty_on and hvp.double_backward(sim):  # named as the outer step names it
        f, r = hvp.graphs(sim)
        graph_f, graph_r = graph_f or f, graph_r or r
        why.append(f"similarity={sim.name!r} with outer_hvp={hvp.name!r} and rho > 0")
    return graph_f, graph_r, " and ".join(why)


def step_cost(sim: SimilarityMode, hvp: OuterHvpMode, inner_steps: int, outer_steps: int,
              penalty_on: bool) -> float:
    """Gradient evaluations of one ``OFMU.step``: what a benchmark's budget should charge.

    An inner step backpropagates both losses (``sim.cost``). An outer step with the penalty
    forms ``v = u`` (``sim.cost``) and ``h`` (``hvp.cost``); without it, it backpropagates the
    retain loss and only runs the forget forward (the closure computes both)."""
    if penalty_on and hvp.penalised:
        outer = sim.cost + hvp.cost(sim)
    else:
        outer = 1 + FORWARD_COST
    return inner_steps * sim.cost + outer_steps * outer
