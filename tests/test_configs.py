"""Every shipped YAML loads with the keys of openseg and all projects (catches renamed or
misspelled keys in configs no other test builds)."""
from pathlib import Path

import pytest

from openseg.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_loads(config):
    cfg = load_config(str(config))
    assert cfg.MODEL.META_ARCHITECTURE
