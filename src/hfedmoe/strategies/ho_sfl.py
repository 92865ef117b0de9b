"""HO-SFL (arXiv 2603.14773) and the two baselines of its comparison, sfl and zo-sfl: split
federated learning of an MoE model (the split itself: hfedmoe.split; docs/ho-sfl.md).

Every round, each sampled client takes ONE mini-batch (drawn from its round seed) and:

* ``ho-sfl``: sends the cut-layer activations z (no backward), gets back lambda = dL/dz
  from the server, and uploads P scalars v_p = <lambda, f(theta + mu u_p) - f(theta)>
  (P + 1 forwards, no backward). Two exchanges.
* ``sfl`` (first-order split learning): the same first exchange; then the client
  back-propagates lambda through its part and uploads the gradient of theta_c (d_c floats).
  Two exchanges.
* ``zo-sfl`` (zeroth order without the server's first-order help): the client sends z at
  theta_c and at each theta_c + mu u_p (P + 1 activation sets); the server returns nothing:
  it evaluates the loss at each and forms v_p = L(z_p) - L(z). One exchange.

The server part (blocks above the cut, the head) trains first-order in every variant: one
AdamW step per round on the mean of the clients' losses. The client part theta_c takes one
AdamW step per round, in every variant on the server's copy, with
  ho-sfl, zo-sfl: g = (1 / (P mu)) sum_p vbar_p u_p (vbar: the mean over the clients that
                  completed the round; hfedmoe.split.zo_gradient),
  sfl:            g = the mean of the clients' exact gradients,
so the three differ only in how g is obtained: the comparison the paper makes.

Decisions where the paper and the issue leave room (docs/ho-sfl.md has the reasons):

* **How clients stay in sync.** Clients in this framework keep no model between rounds (a
  simulated client is a function call), so the server sends theta_c with the first exchange
  (download d_c floats per client and round) and each client keeps it in its node state for
  the second. The UPLOAD is what HO-SFL makes dimension-free (P scalars); a client that
  missed rounds is in sync by construction. The replay alternative (clients keep theta_c and
  the optimizer state and replay (seed, vbar) histories) is not built.
* **Optimizer.** AdamW on both sides (the public code's choice), the server part with
  ``train.lr``, the client part with ``ho-sfl.client-lr`` (0: ``train.lr``); one optimizer
  state per side, kept on the server and in its checkpoints (SplitServer.state_dict), so
  a resumed run continues both exactly.
* **lambda** is per client, dL_m/dz_m of that client's mean loss; the ZO scalars are averaged
  over clients, so g estimates the gradient of the mean of the clients' losses, the same
  objective the server part steps on.
* **A client lost between the two exchanges** is left out of the average (its activations
  still trained the server part); a round with fewer than ``federation.min-replies`` valid
  first replies changes nothing.
* The routers' load-balancing loss is not used (the client cannot back-propagate it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from hfedmoe.model.state import expert_of
from hfedmoe.selection import IBSelector
from hfedmoe.split import (SplitModel, apply_gradient, holder_mean_gradient, mean_scalars,
                           perturbed, zo_gradient, zo_scalars)
from hfedmoe.training import make_optimizer, sample_probabilities, trace_counts

PHASES = {"ho-sfl": ("forward", "zo"), "sfl": ("forward", "gradient"), "zo-sfl": ("perturbed",)}


@dataclass(frozen=True)
class SplitMethod:
    """One split-learning variant (module docstring) and its settings."""

    name: str  # "ho-sfl" | "sfl" | "zo-sfl"
    split_layer: int
    directions: int  # P
    mu: float
    active_experts: bool = False  # ho-sfl: perturb only the experts HFedMoE's selection picks

    @property
    def phases(self) -> tuple[str, ...]:
        """The round's exchanges (hfedmoe.federation.records.SPLIT_PHASES)."""
        return PHASES[self.name]

    @property
    def uses_directions(self) -> bool:
        return self.name != "sfl"


def split_method(config) -> SplitMethod:
    """The split-learning method of a RunConfig whose ``method`` is one of them."""
    h = config.ho_sfl
    if config.method not in PHASES:
        raise ValueError(f"method {config.method!r} is not a split-learning method")
    return SplitMethod(config.method, h.split_layer, h.directions, h.mu,
                       h.active_experts and config.method == "ho-sfl")


# --- client half ---------------------------------------------------------------------------


def client_answer(method: SplitMethod, split: SplitModel, phase: str,
                  batch: Mapping[str, torch.Tensor], seeds: Sequence[int],
                  cut_gradient: torch.Tensor | None,
                  active: torch.Tensor | None = None) -> dict:
    """What one client computes in ``phase`` on its round's ``batch`` (input_ids,
    attention_mask, labels; on the model's device): ``forward`` -> {"z"}; ``perturbed`` ->
    {"z", "perturbed": [z_p]}; ``zo`` -> {"scalars"} (with ``active``, (L, S) bool from
    :func:`active_client_experts`: only those experts of the client part are perturbed, and
    "active" is returned too); ``gradient`` -> {"gradient": key -> dL/dtheta_c}. The client
    part runs in eval mode; theta_c is left as it came."""
    model = split.adapter.model
    model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if phase == "forward":
        return {"z": split.client_forward(ids, mask)}
    if phase == "perturbed":
        z = split.client_forward(ids, mask)
        return {"z": z, "perturbed": perturbed_activations(split, ids, mask, seeds, method.mu)}
    if cut_gradient is None:
        raise ValueError(f"phase {phase!r} needs the cut-layer gradient")
    lam = cut_gradient.to(next(model.parameters()).device)
    if phase == "zo":
        include = None if active is None else included_parameters(split.client_keys, active)
        answer = {"scalars": zo_scalars(lambda: split.client_forward(ids, mask),
                                        split.client_parameters, lam, seeds, method.mu,
                                        include)}
        return answer if active is None else {**answer, "active": active}
    if phase == "gradient":
        params = split.client_parameters
        z = split.client_forward(ids, mask, grad=True)
        if z.shape != lam.shape:
            raise ValueError(f"cut gradient {tuple(lam.shape)} does not match z {tuple(z.shape)}")
        grads = torch.autograd.grad(z, params, lam, allow_unused=True)
        return {"gradient": {key: (g if g is not None else torch.zeros_like(p)).detach()
                             for key, p, g in zip(split.client_keys, params, grads)}}
    raise ValueError(f"unknown split phase {phase!r}")


def included_parameters(client_keys: Sequence[str], active: torch.Tensor) -> list[bool]:
    """Per client-part key: perturbed under ``ho-sfl.active-experts``? An expert's tensors
    when ``active[layer, expert]``; routers and other trainables always."""
    return [(expert := expert_of(key)) is None or bool(active[expert]) for key in client_keys]


def part_budget(budget_experts: int, total_experts: int, part_experts: int) -> int:
    """The client's budget within its part (``ho-sfl.active-experts``): the same share of
    the part's experts as C_budget is of the whole model's, at least 1."""
    return max(1, min(part_experts, round(budget_experts * part_experts / total_experts)))


@torch.no_grad()
def active_client_experts(split: SplitModel, batch: Mapping[str, torch.Tensor], budget: int,
                          lam: float, beta: float) -> torch.Tensor:
    """HFedMoE's per-batch selection (Eqs. 3-5, 14, 15; hfedmoe.selection.IBSelector) over the
    client part's MoE layers, ``budget`` experts at most: (L, S) bool over the whole model,
    False in the server's layers."""
    adapter, ids, mask = split.adapter, batch["input_ids"], batch["attention_mask"]
    geometry = adapter.geometry
    with adapter.trace_routing() as trace:
        split.client_forward(ids, mask)
    layers = len(trace.probabilities)  # the MoE layers below the cut
    routed = trace_counts(trace, mask, geometry.num_experts) > 0  # (layers, S)
    chosen = IBSelector(lam, beta, budget)(sample_probabilities(trace, mask), routed).active
    active = torch.zeros(geometry.num_layers, geometry.num_experts, dtype=torch.bool)
    active[:layers] = chosen
    return active


def perturbed_activations(split: SplitModel, ids: torch.Tensor, mask: torch.Tensor,
                          seeds: Sequence[int], mu: float) -> list[torch.Tensor]:
    """z at theta_c + mu u_p for each seed (zo-sfl); theta_c restored bit for bit."""
    return [split.client_forward(ids, mask)
            for _ in perturbed(split.client_parameters, seeds, mu)]


# --- server half ---------------------------------------------------------------------------


class SplitServer:
    """The server's side of a split-learning run: the server part's first-order steps and
    the client part's update, on the server's copy of the whole model (``split``), with one
    AdamW state per side kept across rounds."""

    def __init__(self, method: SplitMethod, split: SplitModel,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 lr: float, client_lr: float, weight_decay: float = 0.0) -> None:
        self.method, self.split, self.loss_fn = method, split, loss_fn
        self._server_optimizer = make_optimizer(split.server_parameters, lr, weight_decay)
        self._client_optimizer = make_optimizer(split.client_parameters, client_lr or lr,
                                                weight_decay)
        self._clients = 0

    def state_dict(self) -> dict[str, dict]:
        """Both AdamW states (``"server"``, ``"client"``: torch ``Optimizer.state_dict()``),
        for a checkpoint (hfedmoe.checkpoint)."""
        return {"server": self._server_optimizer.state_dict(),
                "client": self._client_optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Mapping]) -> None:
        """Restore :meth:`state_dict`'s output (the same model and split). Raises ValueError
        when ``state`` lacks a side or does not fit that side's parameters."""
        for side, optimizer in (("server", self._server_optimizer),
                                ("client", self._client_optimizer)):
            if side not in state:
                raise ValueError(f"no {side}-part optimizer state in the checkpoint")
            try:
                optimizer.load_state_dict(state[side])
            except (ValueError, KeyError) as exc:
                raise ValueError(f"the {side}-part optimizer state does not fit: {exc}") from None

    def begin_round(self) -> None:
        self.split.adapter.model.zero_grad(set_to_none=True)
        self._clients = 0

    def add_client(self, z: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   perturbed: Sequence[torch.Tensor] = ()) -> tuple[float, torch.Tensor,
                                                                    list[float]]:
        """One client's batch: its loss L_m, lambda_m = dL_m/dz (B, T, H) and, for zo-sfl,
        the scalars v_p = L_m(z_p) - L_m(z). The server part's gradient accumulates. Raises
        ValueError if the batch does not fit the model (e.g. a label out of range); nothing
        accumulates then."""
        model = self.split.adapter.model
        device = next(model.parameters()).device
        z, mask, labels = z.to(device), attention_mask.to(device), labels.to(device)
        before = [None if p.grad is None else p.grad.clone() for p in self.split.server_parameters]
        model.train()
        try:
            loss, lam = self.split.server_loss(z, mask, labels, self.loss_fn)
            if not torch.isfinite(loss):
                raise ValueError(f"the loss on this batch is {float(loss)}")
            scalars = []
            with torch.no_grad():
                for z_p in perturbed:
                    scalars.append(float(self.loss_fn(
                        self.split.server_logits(z_p.to(device), mask), labels)) - float(loss))
        except (RuntimeError, IndexError, ValueError) as exc:
            for param, grad in zip(self.split.server_parameters, before):
                param.grad = grad  # this client's contribution undone
            raise ValueError(f"its batch does not fit the model: {str(exc).splitlines()[0]}") \
                from None
        finally:
            model.eval()
        self._clients += 1
        return float(loss), lam.cpu(), scalars

    def step_server_part(self) -> None:
        """One AdamW step of the server part on the mean of the added clients' losses."""
        if not self._clients:
            return
        for param in self.split.server_parameters:
            if param.grad is not None:
                param.grad.div_(self._clients)
        self._server_optimizer.step()
        self._server_optimizer.zero_grad(set_to_none=True)

    def step_client_part(self, seeds: Sequence[int], client_scalars: Sequence[Sequence[float]] = (),
                         client_gradients: Sequence[Mapping[str, torch.Tensor]] = (),
                         client_active: Sequence[torch.Tensor] = ()) -> None:
        """One AdamW step of theta_c: from the clients' scalars (ho-sfl, zo-sfl: the
        dimension-free reconstruction; with ``client_active``, each client's (L, S) experts
        of ``ho-sfl.active-experts``, per-parameter holder averages) or the mean of their
        gradients (sfl). No client: no step."""
        params = self.split.client_parameters
        shapes = [p.shape for p in params]
        if self.method.uses_directions:
            if not client_scalars:
                return
            if client_active:
                keys = self.split.client_keys
                grads = holder_mean_gradient(shapes, seeds, [
                    (scalars, included_parameters(keys, active))
                    for scalars, active in zip(client_scalars, client_active)], self.method.mu)
            else:
                grads = zo_gradient(shapes, seeds, mean_scalars(client_scalars),
                                    self.method.mu)
        else:
            if not client_gradients:
                return
            grads = [sum(g[key].float() for g in client_gradients) / len(client_gradients)
                     for key in self.split.client_keys]
        apply_gradient(self._client_optimizer, params, grads)
