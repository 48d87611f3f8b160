"""SIZE parsing and budget -> slots."""

import pytest

from moeinf.errors import BadOption, BudgetTooSmall
from moeinf.runtime.budget import default_budget_bytes, parse_size, slots_for


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("4096", 4096),
        ("1.5 gib", int(1.5 * 2**30)),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_size(text).resolve(10**12) == expected


def test_parse_percentage():
    size = parse_size("25%")
    assert size.fraction == 0.25
    assert size.resolve(400) == 100
    assert str(size) == "25%"


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5GiB", "0%", "150%", "%", "5 G B"])
def test_parse_rejects(text):
    with pytest.raises(BadOption):
        parse_size(text)


def test_slots_for_caps_and_rejects():
    assert slots_for(10_000, 1000, num_experts_total=64, min_slots=2, what="RAM") == 10
    assert slots_for(10**9, 1000, num_experts_total=64, min_slots=2, what="RAM") == 64
    with pytest.raises(BudgetTooSmall, match="at least 2"):
        slots_for(1500, 1000, num_experts_total=64, min_slots=2, what="RAM")


def test_default_budget_keeps_headroom():
    gib = 2**30
    budget, why = default_budget_bytes(16 * gib, 1 * gib, 100 * gib)
    assert budget == 16 * gib - gib - int(3.2 * gib)
    assert "headroom" in why
    budget, why = default_budget_bytes(16 * gib, 1 * gib, 2 * gib)
    assert budget == 2 * gib and "all experts" in why
