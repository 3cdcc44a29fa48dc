"""Other frameworks' checkpoints: `interop.hf` (Hugging Face) is the entry point.

`HFConversionError` lives here so the three stages of the Hugging Face mapping (hf_config, safetensors_io,
hf_weights) raise the same error without importing one another.
"""

from superlm_jax.errors import UserError


class HFConversionError(UserError):
  """A Hugging Face checkpoint (or a model to export) that we cannot represent exactly."""
