"""Self-speculative decoding with the model's own multi-token-prediction modules (DeepSeek-V3, arXiv 2412.19437,
sec. 2.2 and 5.4.3): the MTP modules draft the next `n` tokens, and one forward pass of the main model over
[last token, drafts] verifies them all, writing them into its KV / latent cache. Decode is bound by reading the
weights, so checking n + 1 tokens costs about what one costs; each accepted draft is a token for free.

Acceptance (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", Algorithm 1; Chen
et al. 2023): draft d_j ~ q_j is kept with probability min(1, p_j(d_j) / q_j(d_j)), where p_j is the main model's
sampling distribution at that position given the tokens before it; at the first rejection a token is drawn from
norm(max(0, p_j - q_j)), and when every draft is kept, one more from p_{n+1}. The output then has exactly the
distribution of plain sampling. Greedy decoding is the one-hot case: a draft is kept iff it is the main model's
argmax, so the output is token for token plain greedy decoding's. p and q are the distributions after the same
knobs (repetition penalty over the tokens before the position, temperature, top-k/p, min-p: `sampling_probs`).

Rejected drafts are rolled back by the lengths alone: the cache keeps what the verify pass wrote, and the row's
length is set to its last accepted position, so the next pass overwrites the rest (layers/cache.py's contract).

Which positions of the MTP modules are final. Module k at position p reads h^{k-1}_p and token t_{p+k}
(eq. 21). With the row's committed tokens t_0..t_m (t_m sampled, not yet in the main cache), module k at p is
final when p + k <= m; later positions use drafts and are recomputed once the drafts are settled. So each draft
pass recomputes, for every module k, the window of n + k positions from `boundary - k` (the first position that
was not final at the previous pass), which covers every position up to m - 1, where the drafts are read off.
`hidden[k - 1]` keeps h^{k-1} per position (h^0: the main model's final-norm output, which the verify pass writes)
since module k's window starts one position before module k - 1's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from superlm_jax.generate.sampling import sampling_probs
from superlm_jax.layers.cache import DecodeCache, write_at


@struct.dataclass
class DraftState:
  caches: tuple  # the block-attention cache of each MTP module used, [batch, max_len, ...] per module
  hidden: jax.Array  # [n, batch, max_len, embed]: hidden[k - 1][:, p] = h^{k-1}_p, module k's input at p
  tokens: jax.Array  # int32 [batch, max_len + n + 1]: committed tokens (prompt, generated), then drafts
  boundary: jax.Array  # int32 [batch]: module k's cache is final below position boundary - k


@dataclasses.dataclass
class SpeculativeStats:
  """What the drafts bought, over the verify passes of rows that were still generating. `accepted[j - 1]`: the
  passes in which drafts 1..j were all accepted."""
  steps: int
  accepted: list[int]

  def acceptance_rates(self) -> list[float]:
    """Per draft position j = 1..n: the fraction of verify passes that accepted drafts 1..j."""
    return [a / self.steps if self.steps else 0.0 for a in self.accepted]

  def tokens_per_step(self) -> float:
    """Tokens each verify pass yields on average: 1 (the main model's own) plus the accepted drafts."""
    return 1.0 + sum(self.acceptance_rates())


def init_draft_state(model, draft_tokens: int, tokens: jax.Array, max_len: int, cache_dtype=None) -> DraftState:
  """The draft state of a batch whose (right-padded) prompts are `tokens` [batch, prompt_pad]; the MTP caches in
  `cache_dtype` (default: the compute dtype), as the main cache."""
  batch = tokens.shape[0]
  dtype = model.compute_dtype
  caches = tuple(model.mtp[i].init_cache(batch, max_len, cache_dtype or dtype) for i in range(draft_tokens))
  history = jnp.zeros((batch, max_len + draft_tokens + 1), jnp.int32).at[:, :tokens.shape[1]].set(tokens)
  hidden = jnp.zeros((draft_tokens, batch, max_len, model.spec.d_model), dtype)
  return DraftState(caches=caches, hidden=hidden, tokens=history, boundary=jnp.zeros((batch,), jnp.int32))


def _gather(array: jax.Array, positions: jax.Array) -> jax.Array:
  """array[b, positions[b, i]] for [batch, len, ...] arrays; positions past the end read the last slot (they are
  never-committed positions of a window, whose results are discarded)."""
  positions = jnp.clip(positions, 0, array.shape[1] - 1)
  return jnp.take_along_axis(array, positions.reshape(positions.shape + (1,) * (array.ndim - 2)), axis=1)


def _model_positions(model, positions: jax.Array) -> jax.Array:
  # Windows may run past the context at positions that are never committed (the cache holds a few slots more than
  # max_seq_len so that a verify pass always fits); a learned position table has no row there.
  return jnp.minimum(positions, model.spec.max_seq_len - 1)


def _run_module(model, k: int, state: DraftState, start: jax.Array, width: int) -> tuple[jax.Array, DraftState]:
  """MTP module k (1-based) over the `width` positions from `start` [batch]: its normalised outputs
  [batch, width, embed], and the state with its cache and (for modules that feed another) h^k written."""
  positions = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
  previous = _gather(state.hidden[k - 1], positions)
  next_tokens = _gather(state.tokens, positions + k)
  out, normalised, cache = model.mtp[k - 1](previous, model.embed(next_tokens, model.compute_dtype),
                                            _model_positions(model, positions), cache=state.caches[k - 1],
                                            lengths=start)
  caches = state.caches[:k - 1] + (cache,) + state.caches[k:]
  hidden = state.hidden
  if k < hidden.shape[0]:
    hidden = hidden.at[k].set(write_at(hidden[k], out, start))
  return normalised, state.replace(caches=caches, hidden=hidden)


def _history_mask(tokens: jax.Array, before: jax.Array) -> jax.Array:
  """bool [batch, len]: the history slots before position `before` [batch]."""
  return jnp.arange(tokens.shape[1])[None, :] < before[:, None]


def prefill_drafts(model, state: DraftState, hidden: jax.Array, first_token: jax.Array,
                   prompt_lens: jax.Array) -> DraftState:
  """After the main model's prefill (`hidden` its final-norm output over the padded prompts, `first_token` the
  token it sampled): every MTP module over the prompt positions, so their caches hold the prompt."""
  batch, prompt_pad = hidden.shape[:2]
  zeros = jnp.zeros((batch,), jnp.int32)
  state = state.replace(tokens=write_at(state.tokens, first_token[:, None], prompt_lens),
                        hidden=state.hidden.at[0].set(write_at(state.hidden[0], hidden, zeros)))
  for k in range(1, len(state.caches) + 1):
    _, state = _run_module(model, k, state, zeros, prompt_pad)
  # Module k was final at positions p <= L - k; from L - k on it is recomputed (the first draft reads L - 1).
  return state.replace(boundary=prompt_lens)


def draft(model, state: DraftState, lengths: jax.Array, key: jax.Array, knobs: dict):
  """(drafts int32 [batch, n], their distributions q [batch, n, vocab], state with the drafts in its tokens).
  `lengths` [batch]: the main cache lengths m (the last committed token t_m is at tokens[m])."""
  n = len(state.caches)
  head = model.output_head()
  drafts, dists = [], []
  for k, key_k in zip(range(1, n + 1), jax.random.split(key, n)):
    start = jnp.maximum(state.boundary - k, 0)
    normalised, state = _run_module(model, k, state, start, n + k)
    # Module k at position m - 1 predicts t_{m+k} from h^{k-1}_{m-1} and t_{m+k-1} (a draft for k > 1).
    at_last = _gather(normalised, (lengths - 1 - start)[:, None])[:, 0]
    logits = (at_last @ head).astype(jnp.float32)
    q = sampling_probs(logits, token_history=state.tokens,
                       history_mask=_history_mask(state.tokens, lengths + k), **knobs)
    token = jax.random.categorical(key_k, jnp.log(q), axis=-1).astype(jnp.int32)
    state = state.replace(tokens=write_at(state.tokens, token[:, None], lengths + k))
    drafts.append(token)
    dists.append(q)
  return jnp.stack(drafts, axis=1), jnp.stack(dists, axis=1), state


def verify(model, cache: DecodeCache, state: DraftState, drafts: jax.Array, draft_dists: jax.Array,
           alive: jax.Array, key: jax.Array, knobs: dict):
  """One main-model pass over [t_m, d_1..d_n]: (tokens [batch, n + 1], their log-probs under the model, counts
  [batch] = accepted drafts + 1, cache, state). A row's tokens[:count] are its new committed tokens: the accepted
  drafts, then the main model's own (a residual draw at the first rejection, or the token after the last draft).
  Rows not `alive` keep their lengths (their results are discarded)."""
  batch, n = drafts.shape
  lengths = cache.lengths
  offsets = jnp.arange(n + 1, dtype=jnp.int32)
  positions = lengths[:, None] + offsets[None, :]
  hidden, cache = model.hidden(_gather(state.tokens, positions), positions=_model_positions(model, positions),
                               cache=cache)
  logits = (hidden @ model.output_head()).astype(jnp.float32)  # [batch, n + 1, vocab]
  vocab = logits.shape[-1]
  # p_j for every position at once: rows repeated per position, each with the history before its token.
  history = jnp.repeat(state.tokens, n + 1, axis=0)
  before = positions.reshape(-1) + 1
  p = sampling_probs(logits.reshape(-1, vocab), token_history=history, history_mask=_history_mask(history, before),
                     **knobs).reshape(batch, n + 1, vocab)
  key_accept, key_residual = jax.random.split(key)
  p_draft = jnp.take_along_axis(p[:, :n], drafts[..., None], axis=-1)[..., 0]
  q_draft = jnp.take_along_axis(draft_dists, drafts[..., None], axis=-1)[..., 0]
  # Keep d_j with probability min(1, p/q): u q < p, u ~ U[0, 1). Greedy: q = 1 and p is 1 or 0.
  kept = jax.random.uniform(key_accept, (batch, n)) * q_draft < p_draft
  accepted = jnp.sum(jnp.cumprod(kept.astype(jnp.int32), axis=1), axis=1)  # [batch], 0..n
  # At the first rejection j: norm(max(0, p_j - q_j)); after n accepted drafts: p_{n+1} (q padded with zeros).
  residual = jnp.maximum(p - jnp.pad(draft_dists, ((0, 0), (0, 1), (0, 0))), 0.0)
  residual = _gather(residual, accepted[:, None])[:, 0]
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, _gather(p, accepted[:, None])[:, 0])
  last = jax.random.categorical(key_residual, jnp.log(residual), axis=-1).astype(jnp.int32)
  tokens = jnp.where(offsets[None, :] < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), last[:, None])
  logprobs = (jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
              - jax.nn.logsumexp(logits, axis=-1))
  state = state.replace(tokens=write_at(state.tokens, tokens, lengths + 1),
                        hidden=state.hidden.at[0].set(write_at(state.hidden[0], hidden, lengths)),
                        boundary=jnp.where(alive, lengths + 1, state.boundary))
  cache = cache.with_lengths(jnp.where(alive, lengths + accepted + 1, lengths))
  return tokens, logprobs, accepted + 1, cache, state
