"""HO-SFL's core (hfedmoe.split) against independent re-computations: the split model equals
the whole one, the cut-layer gradient is autograd's, the zeroth-order scalars are directional
derivatives, the dimension-free reconstruction is bit-identical across processes and linear in
the scalars, and the estimator is unbiased."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from hfedmoe.config import parse_run_config
from hfedmoe.model import load_adapter
from hfedmoe.model.state import set_trainable
from hfedmoe.split import (SplitModel, apply_gradient, direction_seeds, gaussian_directions,
                           holder_mean_gradient,
                           mean_scalars, zo_gradient, zo_scalars)
from hfedmoe.tasks.classification import classification_loss


def _split(family: str = "qwen2_moe", split_layer: int = 1):
    config = parse_run_config({"model.name": f"tiny:{family}"})
    adapter = load_adapter(config.model, num_labels=3, seed=0)
    trainable = set_trainable(adapter, "head")
    return SplitModel(adapter, split_layer, trainable)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask, torch.randint(0, 3, (3,), generator=g)


def test_linear_part_scalars_are_exact_directional_derivatives():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 6))
    x, lam = torch.randn(5, 6), torch.randn(5, 4)
    seeds = [11, 12, 13]
    scalars = zo_scalars(lambda: x @ weight.T, [weight], lam, seeds, mu=1e-3)
    for seed, value in zip(seeds, scalars):
        (u,) = gaussian_directions(seed, [weight.shape])
        exact = float((lam.double() * (x.double() @ u.double().T)).sum())  # <lambda, J u>
        assert value / 1e-3 == pytest.approx(exact, rel=1e-3)


def test_quadratic_part_error_shrinks_with_mu():
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    x, lam = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    forward = lambda: (x @ weight.T) ** 2  # noqa: E731
    (u,) = gaussian_directions(5, [weight.shape])
    # <lambda, J u> = sum 2 (x W^T) * (x u^T) * lambda
    exact = float((2 * (x @ weight.detach().T) * (x @ u.double().T) * lam).sum())
    errors = [abs(zo_scalars(forward, [weight], lam, [5], mu)[0] / mu - exact)
              for mu in (1e-2, 1e-3)]
    assert errors[1] < errors[0] / 5  # O(mu) forward-difference error
    assert errors[1] < 1e-2 * abs(exact) + 1e-6


def test_parameters_restored_bit_for_bit():
    weight = torch.nn.Parameter(torch.randn(4, 6))
    before = weight.detach().clone()
    zo_scalars(lambda: weight.sum(1, keepdim=True), [weight], torch.ones(4, 1), [1, 2], 0.1)
    assert torch.equal(weight.detach(), before)


def test_scalar_average_is_the_average_of_the_clients_estimates():
    shapes = [torch.Size([3, 5]), torch.Size([7])]
    seeds = [3, 9, 27]
    clients = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
    averaged = zo_gradient(shapes, seeds, mean_scalars(clients), mu=1e-3)
    each = [zo_gradient(shapes, seeds, s, mu=1e-3) for s in clients]
    for got, parts in zip(averaged, zip(*each)):
        assert torch.allclose(got, sum(parts) / len(parts), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        mean_scalars([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError):
        mean_scalars([])


def test_estimator_is_unbiased_for_the_gradient():
    # g = (1/(P mu)) sum <grad, u_p> mu u_p; averaged over many directions it -> grad
    grad = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    seeds = list(range(1, 4001))
    scalars = [float((grad * u).sum()) * 1e-3 for seed in seeds
               for (u,) in [tuple(gaussian_directions(seed, [grad.shape]))]]
    (estimate,) = zo_gradient([grad.shape], seeds, scalars, mu=1e-3)
    assert torch.allclose(estimate, grad, atol=0.15)


def test_reconstruction_and_step_identical_in_another_process(tmp_path):
    shapes = [torch.Size([4, 3]), torch.Size([5])]
    seeds, scalars, mu = direction_seeds(0, 3, 4), [0.3, -0.1, 0.05, 0.2], 1e-3
    script = textwrap.dedent(f"""
        import torch
        from hfedmoe.split import apply_gradient, zo_gradient
        torch.manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(s)) for s in {[list(s) for s in shapes]}]
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(2):
            apply_gradient(opt, params, zo_gradient({[list(s) for s in shapes]}, {seeds},
                                                    {scalars}, {mu}))
        torch.save([p.detach() for p in params], {str(tmp_path / "other.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    torch.manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        apply_gradient(opt, params, zo_gradient(shapes, seeds, scalars, mu))
    other = torch.load(tmp_path / "other.pt")
    assert all(torch.equal(a.detach(), b) for a, b in zip(params, other))


def test_direction_seeds_differ_across_rounds_and_repeat_within():
    assert direction_seeds(0, 1, 3) == direction_seeds(0, 1, 3)
    assert direction_seeds(0, 1, 3) != direction_seeds(0, 2, 3)
    assert len(set(direction_seeds(0, 1, 5))) == 5


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_split_model_equals_the_whole_model_and_lambda_is_autograd(family):
    split = _split(family, split_layer=1)
    model = split.adapter.model.eval()
    ids, mask, labels = _batch()
    z = split.client_forward(ids, mask)
    whole = model.hf_model if hasattr(model, "hf_model") else model.backbone
    hidden = whole(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(z, hidden[1])  # after block 0
    with torch.no_grad():
        reference_logits = model(ids, mask)
    assert torch.allclose(split.server_logits(z, mask).detach(), reference_logits, atol=1e-5)
    # lambda against autograd through the whole model, the cut output captured by a hook
    captured = {}

    def keep(_m, _i, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        captured["z"] = out

    handle = split.cut.register_forward_hook(keep)
    classification_loss(model(ids, mask), labels).backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    loss, lam = split.server_loss(z, mask, labels, classification_loss)
    assert torch.allclose(lam, captured["z"].grad, atol=1e-6)
    assert all(p.grad is None for p in split.client_parameters)  # the client part: nothing
    assert any(p.grad is not None for p in split.server_parameters)


def test_split_keys_partition_the_trainables_by_block():
    split = _split(split_layer=1)
    assert split.client_keys and split.server_keys
    assert set(split.client_keys).isdisjoint(split.server_keys)
    assert set(split.client_keys) | set(split.server_keys) == set(split.trainable)
    assert all(k.startswith(("expert.0.", "router.0.")) for k in split.client_keys)
    with pytest.raises(ValueError, match="split-layer"):
        _split(split_layer=0)


def test_zo_scalars_on_the_split_model_match_autograd_directional_derivatives():
    split = _split(split_layer=1)
    model = split.adapter.model.eval()
    ids, mask, labels = _batch(1)
    z = split.client_forward(ids, mask)
    _, lam = split.server_loss(z, mask, labels, classification_loss)
    model.zero_grad(set_to_none=True)
    # the true gradient of the loss w.r.t. theta_c, by autograd through the whole model
    classification_loss(model(ids, mask), labels).backward()
    grads = [p.grad.double() for p in split.client_parameters]
    seeds = [101, 202, 303, 404]
    # float32 (grouped_mm has no float64); mu small enough that no routing decision flips: at
    # 1e-3 a top-k switch of the perturbed router doubled this estimate (docs/ho-sfl.md)
    mu = 1e-5
    scalars = zo_scalars(lambda: split.client_forward(ids, mask), split.client_parameters,
                         lam, seeds, mu=mu)
    shapes = [p.shape for p in split.client_parameters]
    for seed, value in zip(seeds, scalars):
        exact = sum(float((g * u.double()).sum())
                    for g, u in zip(grads, gaussian_directions(seed, shapes)))
        assert value / mu == pytest.approx(exact, rel=1e-2, abs=1e-4)


def test_holder_mean_averages_each_parameter_over_the_clients_that_moved_it():
    shapes = [torch.Size([2, 3]), torch.Size([4]), torch.Size([5])]
    seeds, mu = [4, 8], 1e-3
    clients = [([0.2, -0.4], [True, False, True]), ([1.0, 0.5], [True, True, False])]
    got = holder_mean_gradient(shapes, seeds, clients, mu)
    each = [zo_gradient(shapes, seeds, scalars, mu) for scalars, _ in clients]
    assert torch.allclose(got[0], (each[0][0] + each[1][0]) / 2)  # both moved it
    assert torch.equal(got[1], each[1][1])  # only client 1
    assert torch.equal(got[2], each[0][2])  # only client 0
    assert holder_mean_gradient(shapes, seeds, [([0.1, 0.1], [False] * 3)], mu) == [None] * 3


def test_excluded_parameters_are_not_perturbed_and_keep_the_shared_stream():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    lam = torch.ones(5)
    forward = lambda: torch.cat([a, b])  # noqa: E731
    both = zo_scalars(forward, [a, b], lam, [9], mu=1.0)[0]
    only_b = zo_scalars(forward, [a, b], lam, [9], mu=1.0, include=[False, True])[0]
    (u_a, u_b) = gaussian_directions(9, [a.shape, b.shape])
    assert only_b == pytest.approx(float(u_b.sum()))  # b's part of the SAME direction
    assert both == pytest.approx(float(u_a.sum() + u_b.sum()))


def test_a_head_tied_to_the_embeddings_is_sent_to_clients_not_perturbed():
    config = parse_run_config({"model.name": "tiny:mixtral", "task": "causal-lm"})
    from hfedmoe.client import build_model

    adapter = build_model(config, 0)
    trainable = set_trainable(adapter, "head")  # the head: "shared.lm_head.weight"
    hf = adapter.model.hf_model
    hf.get_input_embeddings().weight = hf.get_output_embeddings().weight  # tie, as SmolLM2
    split = SplitModel(adapter, 1, trainable)
    assert split.synced_keys == ["shared.lm_head.weight"]
    assert "shared.lm_head.weight" not in split.client_keys  # the server trains it
    assert split.sent_keys == sorted(split.client_keys + ["shared.lm_head.weight"])
    untied = _split("mixtral")
    assert untied.synced_keys == [] and untied.sent_keys == untied.client_keys
