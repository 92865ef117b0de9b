import pytest

from hfedmoe.model.state import EXPERT, ROUTER, SHARED, StateKey, expert_of, parse_key


@pytest.mark.parametrize("key", [StateKey(EXPERT, "down_proj", 3, 7),
                                 StateKey(ROUTER, "weight", 2),
                                 StateKey(SHARED, "classifier.weight")])
def test_keys_round_trip(key):
    assert parse_key(str(key)) == key


def test_expert_of_and_malformed_keys():
    assert expert_of("expert.1.5.up.weight") == (1, 5)
    assert expert_of("router.1.weight") is None
    for bad in ("expert.x.1.w", "router.weight", "shared.", "bias"):
        with pytest.raises(ValueError, match="malformed state key"):
            parse_key(bad)
