"""Device profiles, spec strings and the cost model -> C_budget, against hand computations."""

import math
import re

import pytest

from hfedmoe.budget import (
    GIB,
    PRESETS,
    DeviceProfile,
    ExpertCost,
    budget_from_profile,
    expert_cost,
    parse_budget_spec,
    parse_bytes,
    parse_profile,
    resolve_budget,
)


def test_profile_validation():
    with pytest.raises(ValueError, match="memory_bytes"):
        DeviceProfile("x", 0, 1.0)
    with pytest.raises(ValueError, match="relative_speed"):
        DeviceProfile("x", 10, 0.0)
    with pytest.raises(ValueError, match="name"):
        DeviceProfile("", 10, 1.0)
    with pytest.raises(AttributeError):
        PRESETS["phone"].memory_bytes = 1
    with pytest.raises(TypeError):
        PRESETS["mine"] = DeviceProfile("mine", 1)  # presets are read-only


def test_presets_are_ordered_by_memory_and_speed():
    names = ["phone", "laptop", "workstation", "server"]
    assert list(PRESETS) == names
    memories = [PRESETS[n].memory_bytes for n in names]
    speeds = [PRESETS[n].relative_speed for n in names]
    assert memories == sorted(memories) and speeds == sorted(speeds)
    assert PRESETS["workstation"].relative_speed == 1.0


@pytest.mark.parametrize("text, expected", [
    ("512", 512), ("2GiB", 2 * 1024**3), ("1.5GB", 1_500_000_000), ("300 MiB", 300 * 2**20),
    ("4kb", 4000), ("1TiB", 2**40), ("7B", 7),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 parsecs", "-1GB", "1e3"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


def test_parse_profile_forms():
    assert parse_profile("laptop") == parse_profile("Laptop") == PRESETS["laptop"]
    custom = parse_profile("mem=2GiB:speed=0.5")
    assert (custom.memory_bytes, custom.relative_speed) == (2 * GIB, 0.5)
    assert parse_profile("mem=100MB").relative_speed == 1.0
    overridden = parse_profile("phone:speed=0.1")
    assert (overridden.memory_bytes, overridden.relative_speed) == (4 * GIB, 0.1)
    for bad, message in [("toaster", "unknown device profile"), ("speed=0.5", "needs mem"),
                         ("laptop:ram=1GB", "mem=SIZE"), ("mem=lots", "bad mem"),
                         ("mem=1GB:speed=-1", "relative_speed")]:
        with pytest.raises(ValueError, match=message):
            parse_profile(bad)


def test_parse_budget_spec_mixes_entries():
    entries = parse_budget_spec(" 2, all ,phone, mem=1GiB:speed=0.5")
    assert entries[:3] == (2, "all", PRESETS["phone"])
    assert entries[3].memory_bytes == GIB
    for bad, message in [("", "empty"), ("2,,3", "empty entry"), ("0", ">= 1"),
                         ("-3", ">= 1"), ("2,laptob", "unknown device profile")]:
        with pytest.raises(ValueError, match=message):
            parse_budget_spec(bad)


def test_expert_cost_matches_hand_computation():
    # Gated expert: H=8, I=16 -> 3*8*16 = 384 params; 64 tokens, top-2 of 8 experts -> 16 tokens.
    cost = expert_cost(384, 8, 16, tokens_per_batch=64, top_k=2, num_experts=8)
    assert cost.param_bytes == 384 * 4 and cost.grad_bytes == 384 * 4
    assert cost.optimizer_bytes == 2 * 384 * 4
    assert cost.activation_bytes == 16 * (8 + 4 * 16) * 4
    assert cost.total_bytes == 4 * 384 * 4 + 16 * 72 * 4
    plain = expert_cost(256, 8, 16, tokens_per_batch=10, top_k=1, num_experts=3,
                        bytes_per_element=2, gated=False)
    assert plain.activation_bytes == math.ceil(10 / 3 * (8 + 2 * 16) * 2)
    with pytest.raises(ValueError, match="top_k"):
        expert_cost(1, 1, 1, 1, top_k=3, num_experts=2)
    with pytest.raises(ValueError, match="hidden_size"):
        expert_cost(1, 0, 1, 1, 1, 1)


def _largest_fitting(memory, base, per_expert, total):
    best = -1
    for c in range(total + 1):
        if base + c * per_expert <= memory:
            best = c
    return best


@pytest.mark.parametrize("memory, base", [(1000, 100), (1050, 100), (10_000, 0), (430, 100)])
def test_budget_from_profile_is_the_largest_budget_that_fits(memory, base):
    cost = ExpertCost(100, 100, 100, 30)  # 330 bytes per trainable expert
    got = budget_from_profile(DeviceProfile("d", memory, 1.0), cost, base, total_experts=12)
    assert got == min(_largest_fitting(memory, base, 330, 12), 12)
    assert base + got * 330 <= memory


def test_budget_from_profile_time_limit_and_clipping():
    cost = ExpertCost(1, 0, 0, 0)
    roomy = 10**9
    assert budget_from_profile(DeviceProfile("slow", roomy, 0.25), cost, 0, 12) == 3
    assert budget_from_profile(DeviceProfile("odd", roomy, 0.29), cost, 0, 100) == 29
    assert budget_from_profile(DeviceProfile("fast", roomy, 2.0), cost, 0, 12) == 12
    # time never pushes below min_budget (memory allows 12)
    assert budget_from_profile(DeviceProfile("crawl", roomy, 0.01), cost, 0, 12, min_budget=2) == 2


def test_profile_that_cannot_hold_min_budget_names_itself_and_the_bytes():
    cost = ExpertCost(100, 100, 100, 30)
    with pytest.raises(ValueError, match=r"'tiny'.*needs 760 bytes"):
        budget_from_profile(DeviceProfile("tiny", 700, 1.0), cost, 100, 12, min_budget=2)
    with pytest.raises(ValueError, match="'tiny'"):
        budget_from_profile(DeviceProfile("tiny", 50, 1.0), cost, 100, 12)  # base alone too big


def test_resolve_budget_cycles_and_node_config_wins():
    spec = "2,4,48"
    got = [resolve_budget(spec, c, total_experts=48) for c in range(6)]
    assert got == [2, 4, 48, 2, 4, 48]
    assert resolve_budget("all", 3, total_experts=48) == 48
    assert resolve_budget(spec, 0, "7", total_experts=48) == 7  # node config wins
    assert resolve_budget(spec, 0, 7, total_experts=48) == 7
    assert resolve_budget(spec, 1, "", total_experts=48) == 4  # empty node value: run spec
    cost = ExpertCost(GIB, 0, 0, 0)
    assert resolve_budget("phone", 0, total_experts=48, cost=cost, base_bytes=GIB) == 3
    assert resolve_budget("2,workstation", 1, total_experts=48, cost=cost, base_bytes=0) == 32
    with pytest.raises(ValueError, match="cost model"):
        resolve_budget("phone", 0, total_experts=48)
    with pytest.raises(ValueError, match="client_id"):
        resolve_budget("2", -1, total_experts=48)


@pytest.mark.parametrize("spec, fragment", [
    ("49", "budget 49 exceeds the model's 48 experts"),
    ("1", "budget 1 = 1 is below the minimum of 2"),
    ("2%", "budget 2% of 48 experts = 1 is below the minimum of 2"),
])
def test_budgets_outside_the_model_are_rejected_not_rounded(spec, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        resolve_budget(spec, 0, total_experts=48, min_budget=2)
    assert resolve_budget("2,48", 1, total_experts=48, min_budget=2) == 48  # bounds allowed


def test_share_entries_are_shares_of_all_experts():
    from hfedmoe.budget import resolve_budget

    spec = "25%,50%,100%"
    assert [resolve_budget(spec, c, total_experts=48) for c in range(4)] == [12, 24, 48, 12]
    assert resolve_budget("1%", 0, total_experts=48) == 1  # never below one expert
    for bad in ("0%", "150%", "x%"):
        with pytest.raises(ValueError, match="budget spec"):
            resolve_budget(bad, 0, total_experts=48)
