"""bench/random_model.py builds a checkpoint moeinf opens for every family it lists."""

import pytest

from bench.random_model import SHAPES, save_random_model
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.models.registry import FAMILIES


def test_every_supported_family_has_a_benchmark_shape():
    assert set(SHAPES) == {family.name for family in FAMILIES}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_random_model_opens_as_its_family(family, tmp_path):
    checkpoint = Checkpoint.open(save_random_model(family, tmp_path / family))
    assert checkpoint.family.name == family and checkpoint.spec.num_experts == 16
