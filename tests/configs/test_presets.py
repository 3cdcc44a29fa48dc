"""Every preset of every model-family config validates, builds, and matches its accounting."""

import glob
import os

import jax
import pytest

from flax import nnx

from superlm_jax.config import validate
from superlm_jax.errors import UserError
from superlm_jax.models import accounting
from superlm_jax.models.transformer import Transformer
from tests.conftest import load_config_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = ["deepseek_mini", "gpt2_small", "llama_dense", "minideepseek", "smollm2_deepseek"]


def load(name):
  return load_config_module(name)


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_validate_and_build(family):
  module = load(family)
  for preset in module.PRESETS:
    config = module.get_config(preset)
    validate(config)
    # Built abstractly: no memory for the large presets, but every shape is checked.
    model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert params == accounting.parameter_count(config.model)["total"], (family, preset)


def test_minideepseek_cache_is_at_least_4x_smaller_than_mha():
  module = load("minideepseek")
  for preset in module.PRESETS:
    mla = module.get_config(preset).model
    mha = mla.copy_and_resolve_references()
    mha.attention = "mha"
    ratio = accounting.kv_cache_bytes_per_token(mha) / accounting.kv_cache_bytes_per_token(mla)
    assert ratio >= 4, (preset, ratio)


def test_unknown_preset_is_a_user_error():
  with pytest.raises(UserError, match="unknown preset 'huge'"):
    load("gpt2_small").get_config("huge")


STUDIES = ["mla_vs_mha", "moe_balance", "ssmax_nope"]  # experiment configs: several full configs plus a `study` section


def test_config_files_cover_every_family():
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
  assert names == sorted(FAMILIES + STUDIES)
