"""Split learning over an MoE model with backprop-free clients: the pure core of HO-SFL
(Chen, Wu, Wang, Chen, arXiv 2603.14773; issue #16; docs/ho-sfl.md).

The model is cut after its first ``split_layer`` transformer blocks:

* the **client part** f_c(x; theta_c): the embeddings and blocks ``0..split_layer-1``; its
  trainables theta_c are the trainable parameters inside those blocks (the experts and
  routers of their MoE layers; LoRA factors instead of the experts' weights when attached);
* the **server part**: the remaining blocks and the head, with every other trainable.

One round (the Flower glue lives in ``federation``; everything here is plain tensors):

1. a client runs f_c on one mini-batch without gradients: ``z`` (B, T, H), the cut-layer
   activations (:meth:`SplitModel.client_forward`);
2. the server computes each client's loss from ``z`` and back-propagates through its part
   (:meth:`SplitModel.server_loss`): the cut-layer gradient ``lambda_m = dL_m / dz`` (B, T, H)
   goes back to the client, the server part takes one step on the mean loss;
3. for P directions u_p drawn from shared seeds (:func:`gaussian_directions`), the client
   uploads v_p = <lambda_m, f_c(x; theta_c + mu u_p) - f_c(x; theta_c)> (:func:`zo_scalars`):
   P + 1 forward passes, no backward, P scalars up whatever the model size;
4. the server averages the scalars over the clients that answered (:func:`mean_scalars`)
   and anyone holding theta_c rebuilds the same estimate
   g = (1 / (P mu)) sum_p vbar_p u_p (:func:`zo_gradient`; identical bit for bit in every
   process, since only seeds and scalars travel) and applies the same optimizer step.

Why it estimates the gradient: v_p / mu -> <lambda, J u_p> = <J^T lambda, u_p> =
<grad_theta_c L, u_p> as mu -> 0 (J = dz / dtheta_c), and E[u u^T] = I for standard Gaussian
u, so E[g] -> grad_theta_c L: a first-order signal from the server (lambda) with a zeroth-order
client.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from hfedmoe.model.adapter import MoEAdapter


class _CutReached(Exception):
    """Raised by the cut hook to stop the client's forward at the cut layer."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("cut layer reached")
        self.hidden = hidden


def transformer_blocks(model: nn.Module, banks: Sequence[nn.Module]) -> nn.ModuleList:
    """The model's list of transformer blocks: the ``nn.ModuleList`` one of whose elements
    holds the first MoE bank (the outermost such list). Raises ValueError when none does."""
    first = banks[0]
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(
                any(m is first for m in block.modules()) for block in module):
            return module
    raise ValueError("no list of transformer blocks holds the model's MoE layers")


def _hidden_of(output):
    """A block's hidden states: the output itself or its first element."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


@dataclass
class SplitModel:
    """An MoE model cut after block ``split_layer - 1`` (module docstring).

    ``trainable``: the run's trainable parameters by state key (hfedmoe.model.state);
    :attr:`client_keys` / :attr:`server_keys` partition them (sorted; the client's order is
    the order of the ZO directions).
    """

    adapter: MoEAdapter
    split_layer: int
    trainable: Mapping[str, nn.Parameter]

    def __post_init__(self) -> None:
        self.blocks = transformer_blocks(self.adapter.model, self.adapter.banks)
        if not 1 <= self.split_layer < len(self.blocks):
            raise ValueError(f"ho-sfl.split-layer must be in 1..{len(self.blocks) - 1} "
                             f"(the model has {len(self.blocks)} blocks), got {self.split_layer}")
        bottom = {id(p) for block in self.blocks[:self.split_layer] for p in block.parameters()}
        self.client_keys = sorted(k for k, p in self.trainable.items() if id(p) in bottom)
        self.server_keys = sorted(k for k in self.trainable if k not in set(self.client_keys))
        # server-trained tensors the client part also uses: a head tied to the input
        # embeddings (SmolLM2); sent to clients with theta_c, never perturbed by them
        used = {id(p) for p in self._client_weights()}
        self.synced_keys = sorted(k for k in self.server_keys if id(self.trainable[k]) in used)
        if not self.client_keys:
            raise ValueError(f"no trainable parameter in the first {self.split_layer} blocks: "
                             "the client part would have nothing to learn")

    @property
    def client_moe_layers(self) -> int:
        """MoE layers below the cut (their experts are the client part's)."""
        bottom = {id(m) for block in self.blocks[:self.split_layer] for m in block.modules()}
        return sum(1 for bank in self.adapter.banks if id(bank) in bottom)

    @property
    def hidden_size(self) -> int:
        """H of the cut-layer activations (the model config's ``hidden_size``)."""
        model = self.adapter.model
        inner = getattr(model, "hf_model", None) or model.backbone
        return int(inner.config.hidden_size)

    def _client_weights(self) -> list[nn.Parameter]:
        """The client part's weights: the blocks below the cut and the embeddings (parameters
        named ``*embed*`` outside the blocks), trainable or not."""
        blocks = {id(p) for block in self.blocks for p in block.parameters()}
        bottom = [p for block in self.blocks[:self.split_layer] for p in block.parameters()]
        return bottom + [p for name, p in self.adapter.model.named_parameters(
            remove_duplicate=False) if id(p) not in blocks and "embed" in name]

    @property
    def sent_keys(self) -> list[str]:
        """What the server sends a client each round: theta_c and the synced tensors."""
        return sorted(self.client_keys + self.synced_keys)

    def client_weight_bytes(self) -> int:
        """Bytes of the client part's weights (see ``_client_weights``)."""
        unique = {id(p): p for p in self._client_weights()}
        return sum(p.numel() * p.element_size() for p in unique.values())

    @property
    def client_parameters(self) -> list[nn.Parameter]:
        return [self.trainable[k] for k in self.client_keys]

    @property
    def server_parameters(self) -> list[nn.Parameter]:
        return [self.trainable[k] for k in self.server_keys]

    @property
    def cut(self) -> nn.Module:
        return self.blocks[self.split_layer - 1]

    def client_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       grad: bool = False) -> torch.Tensor:
        """z = f_c(x; theta_c): the cut layer's hidden states (B, T, H), float32, without
        running the blocks above the cut; without gradients unless ``grad`` (first-order
        split learning, sfl: the caller back-propagates lambda through it)."""

        def stop(_module, _inputs, output):
            raise _CutReached(_hidden_of(output))

        handle = self.cut.register_forward_hook(stop)
        try:
            with torch.set_grad_enabled(grad):
                self.adapter.model(input_ids, attention_mask)
        except _CutReached as reached:
            return reached.hidden.float()
        finally:
            handle.remove()
        raise RuntimeError("the forward pass never reached the cut layer")

    def server_logits(self, z: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's logits with the cut layer's output replaced by ``z`` (B, T, H). The
        server never sees token ids: the blocks below the cut run on padding ids, without
        gradient, and their output is discarded (the positions and the mask are what the
        blocks above need)."""
        with self._replaced_cut(z):
            placeholder = torch.zeros_like(attention_mask, dtype=torch.long)
            return self.adapter.model(placeholder, attention_mask)

    @contextlib.contextmanager
    def _replaced_cut(self, z: torch.Tensor) -> Iterator[None]:
        def mute(_module, _inputs):
            torch.set_grad_enabled(False)  # the blocks below the cut: no graph

        def replace(_module, _inputs, output):
            torch.set_grad_enabled(True)
            return _with_hidden(output, z.to(_hidden_of(output).dtype))

        first = self.blocks[0].register_forward_pre_hook(mute)
        cut = self.cut.register_forward_hook(replace)
        try:
            with torch.enable_grad():  # restores the caller's grad mode on exit
                yield
        finally:
            first.remove()
            cut.remove()

    def server_loss(self, z: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One client's loss L_m from its cut-layer activations and the cut-layer gradient
        lambda_m = dL_m / dz (B, T, H). The server part's gradients accumulate into its
        parameters' ``.grad`` (scaled by the caller through ``loss_fn``'s weight if needed);
        the client part gets none. Returns (detached loss, lambda_m)."""
        z = z.detach().requires_grad_(True)
        loss = loss_fn(self.server_logits(z, attention_mask), labels)
        loss.backward()
        return loss.detach(), z.grad.detach()


# --- zeroth-order client update, dimension-free aggregation ---------------------------


def gaussian_directions(seed: int, shapes: Sequence[torch.Size]) -> Iterator[torch.Tensor]:
    """The direction u of ``seed``: one standard-Gaussian float32 tensor per shape, drawn in
    order from one CPU generator (so every process draws the same bits)."""
    generator = torch.Generator().manual_seed(seed)
    for shape in shapes:
        yield torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def zo_scalars(forward: Callable[[], torch.Tensor], params: Sequence[nn.Parameter],
               cut_gradient: torch.Tensor, seeds: Sequence[int], mu: float,
               include: Sequence[bool] | None = None) -> list[float]:
    """v_p = <lambda, f(theta + mu u_p) - f(theta)> for each seed p (module docstring, step 3).

    ``forward()``: the client part's output z (B, T, H) at the current parameters;
    ``params``: theta_c in the order the directions are drawn; ``cut_gradient``: lambda
    (B, T, H). ``include`` (one bool per parameter; None: all): only those are perturbed,
    the others keep their share of each direction's random stream unused (so every client
    draws the same u_p whatever it includes). The parameters are restored bit for bit after
    each perturbation. P + 1 forward passes, no backward. Raises ValueError for mu <= 0 or
    no seed."""
    if mu <= 0 or not seeds:
        raise ValueError(f"need mu > 0 and at least one seed, got mu={mu}, {len(seeds)} seeds")
    base = forward().double()
    lam = cut_gradient.double()
    return [float((lam * (forward().double() - base)).sum())
            for _ in perturbed(params, seeds, mu, include)]


@torch.no_grad()
def perturbed(params: Sequence[nn.Parameter], seeds: Sequence[int], mu: float,
              include: Sequence[bool] | None = None) -> Iterator[int]:
    """For each seed in turn: ``params`` moved to theta + mu u_seed (only those ``include``
    marks), the seed yielded, and ``params`` restored bit for bit (also when the caller stops
    early or raises)."""
    include = [True] * len(params) if include is None else list(include)
    saved = [p.detach().clone() for p in params]
    shapes = [p.shape for p in params]
    try:
        for seed in seeds:
            for param, u, moved in zip(params, gaussian_directions(seed, shapes), include):
                if moved:
                    param.add_(u.to(param.device, param.dtype), alpha=mu)
            yield seed
            for param, value in zip(params, saved):
                param.copy_(value)
    finally:
        for param, value in zip(params, saved):
            param.copy_(value)


def mean_scalars(per_client: Sequence[Sequence[float]]) -> list[float]:
    """vbar_p: the mean over clients of each direction's scalar (the clients that answered
    both exchanges). Raises ValueError when empty or when the clients' P differ."""
    if not per_client:
        raise ValueError("no client scalars to average")
    sizes = {len(s) for s in per_client}
    if len(sizes) != 1:
        raise ValueError(f"clients sent different numbers of scalars: {sorted(sizes)}")
    return [sum(float(s[p]) for s in per_client) / len(per_client) for p in range(sizes.pop())]


def zo_gradient(shapes: Sequence[torch.Size], seeds: Sequence[int], scalars: Sequence[float],
                mu: float) -> list[torch.Tensor]:
    """g = (1 / (P mu)) sum_p vbar_p u_p, one float32 tensor per shape (on the CPU). Only
    seeds and scalars enter, so every process rebuilds the same bits."""
    if len(seeds) != len(scalars) or not seeds:
        raise ValueError(f"need one scalar per seed, got {len(seeds)} seeds and "
                         f"{len(scalars)} scalars")
    grads = [torch.zeros(shape, dtype=torch.float32) for shape in shapes]
    scale = 1.0 / (len(seeds) * mu)
    for seed, value in zip(seeds, scalars):
        for grad, u in zip(grads, gaussian_directions(seed, shapes)):
            grad.add_(u, alpha=float(value) * scale)
    return grads


def holder_mean_gradient(shapes: Sequence[torch.Size], seeds: Sequence[int],
                         clients: Sequence[tuple[Sequence[float], Sequence[bool]]], mu: float
                         ) -> list[torch.Tensor | None]:
    """The client part's update when each client perturbed only some parameters
    (``ho-sfl.active-experts``): client m's estimate g^m = (1/(P mu)) sum_p v_mp u_p restricted
    to the parameters it included, averaged per parameter over the clients that included it
    (HFedMoE's holder average, Eq. 17's idea); None for a parameter nobody included.
    ``clients``: (scalars, include) per client. Seeds, scalars and masks are all that enter."""
    sums: list[torch.Tensor | None] = [None] * len(shapes)
    holders = [0] * len(shapes)
    for scalars, include in clients:
        for index, grad in enumerate(zo_gradient(shapes, seeds, scalars, mu)):
            if include[index]:
                sums[index] = grad if sums[index] is None else sums[index] + grad
                holders[index] += 1
    return [None if total is None else total / count for total, count in zip(sums, holders)]


def apply_gradient(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                   grads: Sequence[torch.Tensor | None]) -> None:
    """One ``optimizer`` step with ``grads`` as the parameters' gradients (then cleared); a
    None gradient leaves its parameter and its optimizer state untouched."""
    for param, grad in zip(params, grads):
        param.grad = None if grad is None else grad.to(param.device, param.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def direction_seeds(seed: int, server_round: int, count: int) -> list[int]:
    """The round's P shared direction seeds, drawn by the server from the run seed and the
    round (distinct across rounds; 63-bit, positive)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + server_round)
    return torch.randint(1, 2**62, (count,), generator=generator).tolist()
