"""The engine builds its temporal refiner from the config section: names and defaults must agree."""

import dataclasses

import pytest

from models.temporal import TemporalParams
from pipeline.config import TemporalConfig


def test_temporal_config_and_params_have_the_same_fields_and_defaults():
    assert (
        dataclasses.asdict(TemporalParams(**TemporalConfig().model_dump())) == TemporalConfig().model_dump()
    )


def test_a_config_the_refiner_rejects_is_reported_with_the_field():
    cfg = TemporalConfig(mode="smooth", motion_low=0.5, motion_high=0.1)
    with pytest.raises(ValueError, match="motion_high"):
        TemporalParams(**cfg.model_dump())
