"""Every documented default output-head name routes a Linear head to AdamW (docs/routing.md, "Which
parameters get Muon"). The list is written here, not imported, so dropping a name fails a test."""

import warnings

import pytest
from torch import nn

from lightning_muon import route_parameters

DOCUMENTED_HEADS = ("lm_head", "head", "heads", "classifier", "fc_out", "out_head")


@pytest.mark.parametrize("head", DOCUMENTED_HEADS)
def test_default_head_names_go_to_adamw(head):
    model = nn.ModuleDict({"body": nn.Linear(16, 16), head: nn.Linear(16, 5)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised head: no "no output head" warning either
        groups = {r.name: r.group for r in route_parameters(model)}
    assert groups[f"{head}.weight"] == "adamw"
    assert groups["body.weight"] == "muon"
    nested = nn.Sequential(nn.Linear(16, 16), nn.ModuleDict({head: nn.Linear(16, 5)}))  # a component match
    assert {r.name: r.group for r in route_parameters(nested)}[f"1.{head}.weight"] == "adamw"
