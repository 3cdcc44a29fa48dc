"""Fused Pallas kernel for one MLA decode step in the absorbed form (DeepSeek-V2, arXiv 2405.04434, sec. 2.1.2).

In the absorbed form a decode step attends over the *latent* cache: with q_latent = W_UK^T q_nope per head,

  score[h, t] = scale[b, h] * (q_latent[h] . c_kv[t] + q_rope[h] . k_rope[t])          (eq. 10, 15, 17 absorbed)
  out[h]      = sum_t softmax_t(score[h, :]) c_kv[t]                                   (W_UV is applied afterwards)

Every head reads the same c_kv/k_rope rows, so the kernel loads a block of `block_t` cache rows ONCE and multiplies
it against all heads at the same time: heads are the M dimension of the two block matmuls ([H, R] x [R, block_t] for
scores, [H, block_t] x [block_t, R] for the output). The cache, which is the only large operand, is therefore read
exactly once per step, the bound a memory-bound decode step can reach (FlashMLA does the same).

Grid and reduction (flash-decoding, Dao et al. 2023): the grid is (head group, batch, split). Program (g, b, s) owns
the cache slice [s * split_len, (s + 1) * split_len) of row b for the heads of group g, and runs an online softmax
over it (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022): running max m, running sum l and the
unnormalised f32 accumulator acc, block by block. It writes the partials (acc, m, l); `combine_partials` merges the
splits with a log-sum-exp combine:

  M = max_s m_s,  L = sum_s exp(m_s - M) l_s,  out = sum_s exp(m_s - M) acc_s / L,  lse = M + log L.

Splitting T keeps the machine busy when batch x heads is too small to fill it (decode with long caches). There is
one head group except on GPU with more than 32 heads (DeepSeek-V3's 128): a [heads, kv_lora_rank] f32 accumulator
must fit a program's registers, so groups of 32 heads share the cache read through L2 instead (the group is the
fastest-varying grid axis, so the groups of one split run side by side). A split
that lies wholly past its row's length does no work (`pl.when`) and writes the neutral partial (m = -1e30, l = 0,
acc = 0), which the combine weighs by exp(-1e30 - M) = 0. A row of length 0 (not a valid decode input) gets out = 0
and lse = -inf, never NaN, and cannot affect other rows (rows never mix).

One kernel body; per-backend parameters (`plan_decode`):
  gpu  Pallas Triton (passed `triton.CompilerParams`, since JAX's default GPU lowering is now Mosaic GPU). Triton
       tensors need power-of-two shapes and tl.dot needs every dim >= 16, so heads are padded to a power of two
       >= 16 (queries are tiny) and so are kv_lora_rank / rope_dim (this COPIES the cache, so only when they are not
       already powers of two >= 16; DeepSeek's 512 / 64 are). Each program reads its blocks straight from the
       row's cache by pointer, with the last window clamped to [T - block_t, T) so no read ever leaves the array
       (keys read twice by the clamped window are masked out).
  tpu  Pallas Mosaic. Blocks must have their last two dims divisible by (8, 128) or equal to the array's, so no
       padding is needed (full kv_lora_rank / rope_dim, full heads). The cache BlockSpec covers one split, which
       the pipeline DMAs into VMEM; the lengths are scalar-prefetched into SMEM so that the index map can pin the
       block index of splits past a row's length to the last useful one: an unchanged block index is not fetched
       again, so skipped splits cost no HBM traffic. Rows of an edge block past T are garbage and are zeroed.
  cpu  `interpret=True` (no native lowering; about 0.25 ms per grid step): large blocks, few grid steps.

Dtypes: the cache may be bf16 or f32; queries are cast to the cache dtype (after scaling in f32) so the block
matmuls take two operands of one dtype, with f32 accumulation (bf16 on the tensor cores / MXU; f32 at HIGHEST
precision). Scores, softmax statistics, partials, the combined output and the LSE are all float32.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BACKENDS = ("gpu", "tpu", "cpu")
DECODE_IMPLS = ("auto", "pallas", "xla")  # config.decode.impl
_MASKED = -1e30  # Finite "minus infinity": exp(_MASKED - m) underflows to exactly 0 and never makes NaN.
_GPU_MIN_DOT_DIM = 16  # tl.dot needs M, N, K >= 16.
_GPU_DEFAULT_SMS = 132  # H100/H200 SXM; used when lowering for "cuda" on a machine without a GPU.
PALLAS_GPU_MIN_CAPABILITY = (8, 0)  # Ampere: the oldest NVIDIA GPU where the Triton kernel compiles.


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """Static shapes and block sizes of one kernel launch (everything Pallas needs to know at trace time)."""
  backend: str  # "gpu" | "tpu" | "cpu": selects the compiler parameters and the cache blocking.
  interpret: bool  # Run in the Pallas interpreter (CPU, or any backend's plan emulated on CPU in tests).
  heads: int  # Heads as the kernel sees them (padded to a power of two >= 16 on GPU).
  head_block: int  # Heads per program (M of the block matmuls); heads / head_block head groups.
  latent: int  # kv_lora_rank as the kernel sees it (padded on GPU when needed).
  rope: int  # Rotary width as the kernel sees it; 0 = no rotary part (NoPE MLA).
  cache_len: int  # T as the kernel sees it (padded only for a tiny cache on GPU).
  block_t: int  # Cache rows per inner step: the N dim of the score matmul and the K dim of the output matmul.
  split_len: int  # Cache rows per grid program along T (a multiple of block_t).
  num_splits: int  # Grid size along T: ceil(cache_len / split_len).
  blocked_cache: bool  # TPU: the cache BlockSpec covers one split (VMEM); else the row, read by clamped windows.
  num_warps: int = 4  # Triton only.
  num_stages: int = 2  # Triton only.


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _gpu_sm_count() -> int:
  try:
    return int(getattr(jax.devices("gpu")[0], "core_count", _GPU_DEFAULT_SMS))
  except RuntimeError:
    return _GPU_DEFAULT_SMS


def plan_decode(batch: int, heads: int, cache_len: int, latent: int, rope: int, dtype, *, backend: str | None = None,
                interpret: bool | None = None, block_t: int | None = None, num_splits: int | None = None
                ) -> DecodePlan:
  """Chooses block sizes for `backend` (default: `jax.default_backend()`); `block_t` / `num_splits` override them.

  The defaults are reasoned, not tuned on hardware (none was available when this was written): see
  benchmarks/mla_decode_kernel.py to measure them.
  """
  backend = backend or jax.default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
  interpret = backend == "cpu" if interpret is None else interpret
  itemsize = jnp.dtype(dtype).itemsize
  if backend == "gpu":
    heads_p = max(_GPU_MIN_DOT_DIM, _next_pow2(heads))
    head_block = min(heads_p, 32)  # [32, 512] f32 accumulator = 64 registers per thread over 8 warps
    groups = heads_p // head_block
    latent_p = max(_GPU_MIN_DOT_DIM, _next_pow2(latent))
    rope_p = max(_GPU_MIN_DOT_DIM, _next_pow2(rope)) if rope else 0
    # One block of cache rows is (latent + rope) * block_t * itemsize bytes of shared memory per pipeline stage:
    # 32 rows of DeepSeek's 576 bf16 values = 36 KiB, three stages in flight fit an H100/H200 SM (228 KiB).
    row_bytes = (latent_p + rope_p) * itemsize
    default_block = 64 if row_bytes * 64 <= 40 * 1024 else 32
    block = block_t or default_block
    if block & (block - 1) or block < _GPU_MIN_DOT_DIM:
      raise ValueError(f"GPU block_t must be a power of two >= {_GPU_MIN_DOT_DIM}, got {block}")
    cache_p = max(cache_len, _GPU_MIN_DOT_DIM)
    block = min(block, 1 << (cache_p.bit_length() - 1))  # the clamped window needs block_t <= T
    max_splits = -(-cache_p // block)
    # Enough programs for about two waves over the SMs; the rest of the parallelism is within a program.
    splits = num_splits or min(max_splits, _next_pow2(-(-2 * _gpu_sm_count() // (batch * groups))))
    split_len = _round_up(-(-cache_p // min(splits, max_splits)), block)
    return DecodePlan("gpu", interpret, heads_p, head_block, latent_p, rope_p, cache_p, block, split_len,
                      -(-cache_p // split_len), blocked_cache=False,
                      num_warps=4 if head_block * latent_p <= 16 * 512 else 8,
                      # f32 blocks are twice that (72 KiB): three would leave no room for the queries and Triton's
                      # layout scratch, so two.
                      num_stages=3 if block == 32 and 3 * row_bytes * block <= 128 * 1024 else 2)
  if backend == "tpu":
    # [heads, block_t] scores want block_t a multiple of 128 lanes; a cache block of split_len rows must be a
    # multiple of 8 (f32) / 16 (bf16) sublanes, or all of T. 2048 rows x 576 bf16 = 2.3 MB per buffer in VMEM.
    if cache_len <= (block_t or 512):
      block, split_len = cache_len, cache_len
    else:
      block = block_t or 256
      if block % 128:
        raise ValueError(f"TPU block_t must be a multiple of 128 (or >= the cache length), got {block}")
      split_len = _round_up(-(-cache_len // num_splits), block) if num_splits else max(block, 2048 // block * block)
      split_len = min(split_len, _round_up(cache_len, block))
    return DecodePlan("tpu", interpret, heads, heads, latent, rope, cache_len, block, split_len,
                      -(-cache_len // split_len), blocked_cache=True)
  # CPU: the interpreter pays per grid step, so few large blocks.
  block = min(block_t or 512, cache_len)
  split_len = (_round_up(-(-cache_len // num_splits), block) if num_splits else
               min(_round_up(cache_len, block), 4 * block))
  return DecodePlan("cpu", interpret, heads, heads, latent, rope, cache_len, block, split_len,
                    -(-cache_len // split_len), blocked_cache=False)


def _default_device():
  """The device decode runs on (a seam for tests, which fake a GPU's kind and compute capability)."""
  return jax.devices()[0]


def _compute_capability(device) -> tuple[int, int] | None:
  """(major, minor) of a CUDA device, from its `compute_capability` string ("9.0"); None where it has none."""
  try:
    major, minor = str(device.compute_capability).split(".")[:2]
    return int(major), int(minor)
  except (AttributeError, ValueError):
    return None


def pallas_fallback_reason(device) -> str | None:
  """None where the kernel compiles natively on `device`: TPU (Mosaic) and NVIDIA GPUs of compute capability >= 8.0
  (Triton's bf16 tensor-core dots, which the kernel's block matmuls are, start at Ampere, sm_80; a T4 is 7.5).
  Elsewhere the device it does not compile on, for a notice; "" on CPU, where XLA is simply the better choice."""
  if device.platform == "tpu":
    return None
  if device.platform != "gpu":
    return ""
  capability = _compute_capability(device)
  if capability is None:
    return f"{device.device_kind} (no CUDA compute capability)"
  if capability < PALLAS_GPU_MIN_CAPABILITY:
    return (f"{device.device_kind} (compute capability {capability[0]}.{capability[1]} < "
            f"{PALLAS_GPU_MIN_CAPABILITY[0]}.{PALLAS_GPU_MIN_CAPABILITY[1]})")
  return None


_notices_printed: set[str] = set()


def _notice_once(message: str) -> None:
  # resolve_decode_impl runs at every trace of every MLA layer: one line per process is enough.
  if message not in _notices_printed:
    _notices_printed.add(message)
    print(message, file=sys.stderr)


def resolve_decode_impl(impl: str) -> str:
  """config.decode.impl -> "pallas" | "xla". "auto" is the kernel where Pallas compiles it natively (TPU via
  Mosaic, NVIDIA GPUs of compute capability >= 8.0 via Triton) and XLA elsewhere: silently on CPU, where the
  kernel could only run in the (slow) interpreter, and with a one-line notice on an older GPU (a Colab T4)."""
  if impl not in DECODE_IMPLS:
    raise ValueError(f"unknown decode impl {impl!r}; one of {DECODE_IMPLS}")
  if impl != "auto":
    return impl
  reason = pallas_fallback_reason(_default_device())
  if reason is None:
    return "pallas"
  if reason:
    _notice_once(f"decode.impl=auto: the Pallas MLA decode kernel does not compile on {reason}; decoding with "
                 "the XLA path")
  return "xla"


# ------------------------------------------------------------------------------------------------ the kernel
def _decode_kernel(lengths_ref, *refs, plan: DecodePlan):
  """Program (g, b, s): online softmax of head group g over the valid keys of split s of row b; writes its partial
  (acc, m, l)."""
  if plan.rope:
    q_ref, q_rope_ref, c_ref, k_rope_ref, acc_ref, m_ref, l_ref = refs
  else:
    q_ref, c_ref, acc_ref, m_ref, l_ref = refs
    q_rope_ref = k_rope_ref = None
  b, s = pl.program_id(1), pl.program_id(2)
  split_start = s * plan.split_len
  split_end = jnp.minimum(split_start + plan.split_len, lengths_ref[b])  # keys [split_start, split_end) count
  block_t = plan.block_t
  precision = jax.lax.Precision.HIGHEST if c_ref.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  contract_last = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]

  @pl.when(split_end <= split_start)
  def _empty_split():  # Wholly past the row's length: the neutral partial, weighed 0 by the combine.
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when(split_end > split_start)
  def _attend():
    q = q_ref[...]  # [H, R], already scaled and in the cache dtype
    q_rope = q_rope_ref[...] if plan.rope else None

    def block_step(i, carry):
      m, l, acc = carry
      first = split_start + i * block_t  # global index of this block's first key
      if plan.blocked_cache:  # the ref holds this split only; rows past T of an edge block are garbage
        window = first
        offset = pl.multiple_of(i * block_t, block_t)
      else:  # the ref holds the whole row; clamp the window inside [0, T) (its extra keys are masked below)
        window = jnp.minimum(first, plan.cache_len - block_t)
        offset = window
      c = c_ref[pl.ds(offset, block_t), :]  # [block_t, R]: read once, used by every head
      scores = jax.lax.dot_general(q, c, contract_last, precision=precision, preferred_element_type=jnp.float32)
      if plan.rope:
        k_rope = k_rope_ref[pl.ds(offset, block_t), :]
        scores += jax.lax.dot_general(q_rope, k_rope, contract_last, precision=precision,
                                      preferred_element_type=jnp.float32)
      key = window + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
      valid = (key >= first) & (key < split_end)  # the length mask (and the clamped window's repeats)
      scores = jnp.where(valid, scores, _MASKED)
      # Every block has a valid key (i < num_blocks), so m_new is a real score and masked p are exactly 0.
      m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(scores - m_new)
      l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
      if plan.blocked_cache:  # 0 * garbage could be NaN: zero the rows that are not keys of this split
        row = window + jax.lax.broadcasted_iota(jnp.int32, c.shape, 0)
        c = jnp.where(row < split_end, c, jnp.zeros_like(c))
      acc = alpha * acc + jax.lax.dot_general(p.astype(c.dtype), c, (((1,), (0,)), ((), ())), precision=precision,
                                              preferred_element_type=jnp.float32)
      return m_new, l, acc

    # lax.div, not //: both operands are positive here, and floor division's sign fix-up needs a TPU to lower.
    num_blocks = jax.lax.div(split_end - split_start + block_t - 1, block_t)
    init = (jnp.full(m_ref.shape, _MASKED, jnp.float32), jnp.zeros(l_ref.shape, jnp.float32),
            jnp.zeros(acc_ref.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_blocks, block_step, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def mla_decode_partials(q_latent: jax.Array, q_rope: jax.Array | None, c_kv: jax.Array, k_rope: jax.Array | None,
                        lengths: jax.Array, plan: DecodePlan, *, scale: float | jax.Array = 1.0):
  """The pallas_call alone: per-split partials (acc [B, S, Hk, Rk], m [B, S, Hk, 1], l [B, S, Hk, 1]), float32, in
  the plan's padded head/latent sizes. `mla_decode_attention` is this plus `combine_partials`."""
  batch, heads, latent = q_latent.shape
  cache_len = c_kv.shape[1]
  dtype = c_kv.dtype
  # Scale in f32 before rounding to the cache dtype: s * (q . k) = (s q) . k, and SSMax's per-(row, head)
  # multiplier s_h log n folds in the same way.
  scale = jnp.asarray(scale, jnp.float32)
  scale = scale[..., None] if scale.ndim == 2 else scale
  q = _pad_to(_pad_to((q_latent.astype(jnp.float32) * scale).astype(dtype), 1, plan.heads), 2, plan.latent)
  cache = _pad_to(_pad_to(c_kv, 2, plan.latent), 1, plan.cache_len)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, cache_len)
  operands = [q]
  if plan.rope:
    operands.append(_pad_to(_pad_to((q_rope.astype(jnp.float32) * scale).astype(dtype), 1, plan.heads), 2,
                            plan.rope))
  operands.append(cache)
  if plan.rope:
    operands.append(_pad_to(_pad_to(k_rope.astype(dtype), 2, plan.rope), 1, plan.cache_len))

  # The head group varies fastest, so on GPU the groups reading one cache split are launched together (L2 reuse);
  # on TPU (one group) the split varies fastest, so consecutive skipped splits keep one block index (no DMA).
  grid = (plan.heads // plan.head_block, batch, plan.num_splits)
  if plan.blocked_cache:
    def cache_index(g, b, s, lengths_ref):
      del g
      # Splits past the row's length keep the last useful block index, so the pipeline does not fetch them.
      last = jnp.maximum(jax.lax.div(lengths_ref[b] + plan.split_len - 1, plan.split_len) - 1, 0)
      return b, jnp.minimum(s, last), 0
    cache_block = (None, plan.split_len)
  else:
    cache_index = lambda g, b, s, *_: (b, 0, 0)  # noqa: E731 (the whole row; the kernel picks its windows)
    cache_block = (None, plan.cache_len)
  query_spec = lambda width: pl.BlockSpec((None, plan.head_block, width), lambda g, b, s, *_: (b, g, 0))  # noqa
  in_specs = [query_spec(plan.latent)]
  if plan.rope:
    in_specs.append(query_spec(plan.rope))
  in_specs.append(pl.BlockSpec((*cache_block, plan.latent), cache_index))
  if plan.rope:
    in_specs.append(pl.BlockSpec((*cache_block, plan.rope), cache_index))
  partial_index = lambda g, b, s, *_: (b, s, g, 0)  # noqa: E731
  out_specs = [pl.BlockSpec((None, None, plan.head_block, plan.latent), partial_index),
               pl.BlockSpec((None, None, plan.head_block, 1), partial_index),
               pl.BlockSpec((None, None, plan.head_block, 1), partial_index)]
  out_shape = [jax.ShapeDtypeStruct((batch, plan.num_splits, plan.heads, plan.latent), jnp.float32),
               jax.ShapeDtypeStruct((batch, plan.num_splits, plan.heads, 1), jnp.float32),
               jax.ShapeDtypeStruct((batch, plan.num_splits, plan.heads, 1), jnp.float32)]

  kernel = functools.partial(_decode_kernel, plan=plan)
  if plan.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs)
    compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  else:
    # The lengths vector whole: each program reads its row's entry as a scalar.
    grid_spec = pl.GridSpec(grid=grid, in_specs=[pl.BlockSpec((batch,), lambda g, b, s: (0,)), *in_specs],
                            out_specs=out_specs)
    if plan.backend == "gpu":
      from jax.experimental.pallas import triton as pltriton
      compiler_params = pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)
    else:
      compiler_params = None
  call = pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=plan.interpret,
                        compiler_params=None if plan.interpret else compiler_params, name="mla_decode")
  return call(lengths, *operands)


def combine_partials(acc: jax.Array, m: jax.Array, l: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Log-sum-exp combine of the per-split partials (flash-decoding): (out [B, H, R], lse [B, H]), float32.

  A row without any valid key (length 0) has l = 0 everywhere: out = 0 and lse = -inf instead of 0/0."""
  m_max = jnp.max(m, axis=1)  # [B, H, 1]
  weight = jnp.exp(m - m_max[:, None])  # [B, S, H, 1]; 0 for empty splits (m = -1e30)
  l_sum = jnp.sum(weight * l, axis=1)
  acc_sum = jnp.sum(weight * acc, axis=1)
  nonempty = l_sum > 0
  out = acc_sum / jnp.where(nonempty, l_sum, 1.0)
  lse = jnp.where(nonempty, m_max + jnp.log(jnp.where(nonempty, l_sum, 1.0)), -jnp.inf)
  return out, lse[..., 0]


def mla_decode_attention(q_latent: jax.Array, q_rope: jax.Array | None, c_kv: jax.Array, k_rope: jax.Array | None,
                         lengths: jax.Array, *, scale: float | jax.Array = 1.0, backend: str | None = None,
                         interpret: bool | None = None, block_t: int | None = None, num_splits: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """Absorbed MLA attention of one query token per row over its latent cache, fused in one Pallas kernel.

  Args:
    q_latent: [B, H, R] = W_UK^T q_nope per head (R = kv_lora_rank).
    q_rope: [B, H, P] rotary query part, or None / P = 0 for NoPE MLA.
    c_kv: [B, T, R] latent cache (bf16 or f32); k_rope: [B, T, P] shared rotary keys (or None when P = 0).
    lengths: [B] int32, valid cache entries per row; keys at index >= length are masked (clipped to [0, T]).
    scale: softmax scale, a scalar or [B, H] (e.g. 1/sqrt(d) times SSMax's s_h log n).
    backend: "gpu" | "tpu" | "cpu" parameter set (default `jax.default_backend()`); interpret defaults to
      backend == "cpu". block_t / num_splits override the plan (see `plan_decode`).

  Returns:
    (out [B, H, R], lse [B, H]), both float32: out = softmax(scores) @ c_kv, lse = logsumexp(scores).
  """
  batch, heads, latent = q_latent.shape
  rope = 0 if q_rope is None else q_rope.shape[-1]
  plan = plan_decode(batch, heads, c_kv.shape[1], latent, rope, c_kv.dtype, backend=backend, interpret=interpret,
                     block_t=block_t, num_splits=num_splits)
  acc, m, l = mla_decode_partials(q_latent, q_rope, c_kv, k_rope, lengths, plan, scale=scale)
  out, lse = combine_partials(acc, m, l)
  return out[:, :heads, :latent], lse[:, :heads]


def mla_decode_xla(q_latent: jax.Array, q_rope: jax.Array | None, c_kv: jax.Array, k_rope: jax.Array | None,
                   lengths: jax.Array, *, scale: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array]:
  """The same computation as plain XLA einsums (the layer's absorbed form): the benchmark's reference."""
  scale = jnp.asarray(scale, jnp.float32)
  scale = scale[..., None] if scale.ndim == 2 else scale
  scores = jnp.einsum("bhc,btc->bht", q_latent.astype(c_kv.dtype), c_kv, preferred_element_type=jnp.float32)
  if q_rope is not None and q_rope.shape[-1]:
    scores += jnp.einsum("bhr,btr->bht", q_rope.astype(k_rope.dtype), k_rope, preferred_element_type=jnp.float32)
  scores = scores * scale
  valid = jnp.arange(c_kv.shape[1])[None, None, :] < lengths[:, None, None]
  scores = jnp.where(valid, scores, _MASKED)
  lse = jax.nn.logsumexp(scores, axis=-1)
  probs = jnp.exp(scores - lse[..., None]).astype(c_kv.dtype)
  out = jnp.einsum("bht,btc->bhc", probs, c_kv, preferred_element_type=jnp.float32)
  return out, lse


def gpu_padding_copies_cache(latent: int, rope: int) -> bool:
  """Whether the GPU plan pads (copies) the cache: kv_lora_rank / rope_dim not powers of two >= 16."""
  def needs(width):
    return width and (width & (width - 1) or width < _GPU_MIN_DOT_DIM)
  return bool(needs(latent) or needs(rope))

