"""Padding-free layout of a micro-batch (`train.packing`): the rows side by side in one sequence (or a few bins),
and the prompt a pair's two responses (or a GRPO group's n rollouts) share computed once.

A micro-batch is still built as a right-padded [B, T] batch (`input_ids`, `attention_mask`, `loss_mask`): that is
the *logical* batch the losses index. `pack` lays its tokens out as [K, L] bins:

- position ids restart at 0 for every row, so each row's tokens see the positions they have in the padded batch;
- rows in one `group` (a pair's chosen and rejected, a prompt's rollouts) share their longest common prefix:
  it is laid out once, followed by each member's own suffix, whose position ids continue from the prefix's end;
- attention is confined to a row (and, for a suffix, to its prefix and itself). Without shared prefixes that mask
  is implied by the position ids restarting (transformers' packed-sequence masks for sdpa / eager, flash-attention's
  variable-length kernels for `flash_attention_2`, one bin only): `attention_mask` is None. With shared prefixes it
  is a 4D mask [K, 1, L, L] (sdpa / eager only).

Every logical token (b, t) has one slot in the layout, `slot[b, t]` (shared prefix tokens: the same slot for every
member), and its hidden state there is the one it has in the padded batch: same tokens before it, same positions.
`uft_ray.logprobs` scores token t of row b from the slot of token t - 1, so packing changes the layout, never the
math (tests/unit/test_packing.py holds every loss to the padded one within fp32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# One packed unit in a bin: (start, prefix length, [(branch start, branch length), ...]). A row alone is a unit with
# no prefix and one branch; a pair with a shared prompt, the prompt and two branches.
Unit = tuple[int, int, list[tuple[int, int]]]


@dataclass
class Packed:
    """A micro-batch's packed layout (see the module docstring)."""

    input_ids: torch.Tensor  # [K, L] token ids, bins right-padded with `pad_id`
    position_ids: torch.Tensor  # [K, L]
    slot: torch.Tensor  # [B, T] flat slot (bin * L + position) of each logical token; -1 on padding
    units: list[list[Unit]]  # per bin, its units in order (the bin's padding follows the last)
    tokens: int  # slots holding a token (a shared prefix counted once)
    _masks: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)
    _segments: Segments | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """Slots computed, padding included (K x L)."""
        return int(self.input_ids.numel())

    @property
    def shared(self) -> bool:
        """Whether some branch attends to a prefix it shares with another (then position ids cannot say it)."""
        return any(p > 0 and len(branches) > 1 for units in self.units for _, p, branches in units)

    def allowed(self) -> torch.Tensor:
        """[K, L, L] bool: query slot q may attend to key slot k (causal, inside its row; a branch also to its
        prefix, never to another branch); a padding slot to itself alone."""
        k_bins, width = self.input_ids.shape
        out = torch.zeros(k_bins, width, width, dtype=torch.bool)
        for k, units in enumerate(self.units):
            for start, p, branches in units:
                out[k, start : start + p, start : start + p] = torch.ones(p, p, dtype=torch.bool).tril()
                for b, n in branches:
                    out[k, b : b + n, start : start + p] = True
                    out[k, b : b + n, b : b + n] = torch.ones(n, n, dtype=torch.bool).tril()
        out |= torch.eye(width, dtype=torch.bool)  # padding: no all-masked row (NaN)
        return out.to(self.input_ids.device)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """What a model with sdpa / eager attention gets as `attention_mask`: None when the position ids say it
        all, else the 4D additive mask (0 where allowed, the dtype's minimum elsewhere) in the queries' dtype,
        which both add to their scores."""
        if not self.shared:
            return None
        if dtype not in self._masks:
            allowed = self.allowed()
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._masks[dtype] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        return self._masks[dtype]

    def segments(self) -> Segments:
        """The layout as one batch of attention segments (built once per micro-batch, reused by every layer)."""
        if self._segments is None:
            self._segments = _segments(self)
        return self._segments

    def select(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layout's (bin, position) of logical tokens (rows, cols)."""
        flat = self.slot.to(rows.device)[rows, cols]
        if bool((flat < 0).any()):
            raise ValueError("a scored position falls on padding")
        width = self.input_ids.shape[1]
        return flat // width, flat % width


def common_prefix(seqs: list[torch.Tensor]) -> int:
    """Length of the longest common prefix of 1-D token tensors."""
    n = min(len(s) for s in seqs)
    if len(seqs) < 2 or n == 0:
        return n if len(seqs) < 2 else 0
    same = torch.stack([s[:n] == seqs[0][:n] for s in seqs[1:]]).all(dim=0)
    differ = (~same).nonzero()
    return int(differ[0]) if differ.numel() else n


def _units(rows: list[torch.Tensor], groups: list[list[int]] | None) -> list[tuple[list[int], int]]:
    """(members, shared prefix length) per unit: each group, then every row in no group on its own, in row order."""
    grouped: dict[int, list[int]] = {}
    units: list[tuple[list[int], int]] = []
    for g in groups or []:
        members = [int(i) for i in g]
        if not members or any(i in grouped for i in members):
            raise ValueError(f"groups must be disjoint and non-empty, got {groups}")
        grouped.update(dict.fromkeys(members, len(units)))
        units.append((members, common_prefix([rows[i] for i in members]) if len(members) > 1 else 0))
    units += [([i], 0) for i in range(len(rows)) if i not in grouped]
    return sorted(units, key=lambda u: min(u[0]))


def _bins(sizes: list[int], max_tokens: int | None) -> list[list[int]]:
    """Units into bins of at most `max_tokens` slots, first fit in decreasing size (a unit bigger than the budget
    gets a bin of its own); one bin when there is no budget. Bins keep their units in input order."""
    if max_tokens is None:
        return [list(range(len(sizes)))]
    bins: list[list[int]] = []
    room: list[int] = []
    for u in sorted(range(len(sizes)), key=lambda u: (-sizes[u], u)):
        k = next((k for k, r in enumerate(room) if sizes[u] <= r), None)
        if k is None:
            bins.append([u])
            room.append(max_tokens - sizes[u])
        else:
            bins[k].append(u)
            room[k] -= sizes[u]
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class Segments:
    """Every prefix and branch of a layout as one row of a batch, right-padded: segment s's queries are the flat
    slots `q_index[s, :n_s]` (bin * L + position), its keys `k_index[s, :p_s + n_s]` (its prefix's, then its own),
    and query i sees keys j <= p_s + i. Padding repeats slot 0 of the segment's bin (read, never written)."""

    q_index: torch.Tensor  # [S, Q] long
    k_index: torch.Tensor  # [S, P] long
    written: torch.Tensor  # [S * Q] bool: the queries that are real tokens
    out_index: torch.Tensor  # [sum n_s] long: their flat slots, in `written` order
    mask: torch.Tensor | None  # [S, 1, Q, P] bool when some segment has a prefix; None: plain causal suffices
    longest_keys: int


def _segments(layout: Packed) -> Segments:
    width = layout.input_ids.shape[1]
    segs: list[tuple[list[int], list[int], int]] = []  # (query slots, key slots, prefix length)
    for k, units in enumerate(layout.units):
        base = k * width
        for start, p, branches in units:
            prefix = list(range(base + start, base + start + p))
            if p:
                segs.append((prefix, prefix, 0))
            for b, n in branches:
                own = list(range(base + b, base + b + n))
                segs.append((own, prefix + own, p))
    q_len, k_len = max(len(q) for q, _, _ in segs), max(len(kk) for _, kk, _ in segs)
    q_index = torch.zeros(len(segs), q_len, dtype=torch.long)
    k_index = torch.zeros(len(segs), k_len, dtype=torch.long)
    written = torch.zeros(len(segs), q_len, dtype=torch.bool)
    for s, (q, kk, _) in enumerate(segs):
        pad = (q[0] // width) * width  # slot 0 of its bin
        q_index[s] = torch.tensor(q + [pad] * (q_len - len(q)))
        k_index[s] = torch.tensor(kk + [pad] * (k_len - len(kk)))
        written[s, : len(q)] = True
    mask = None
    if any(p for _, _, p in segs):
        prefix = torch.tensor([p for _, _, p in segs])
        mask = torch.arange(k_len)[None, None, :] <= (torch.arange(q_len)[None, :, None] + prefix[:, None, None])
        mask = mask[:, None]
    device = layout.input_ids.device
    written = written.flatten()
    return Segments(
        q_index=q_index.to(device),
        k_index=k_index.to(device),
        written=written.to(device),
        out_index=q_index.flatten()[written].to(device),
        mask=None if mask is None else mask.to(device),
        longest_keys=k_len,
    )


def pack(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    groups: list[list[int]] | None = None,
    max_tokens: int | None = None,
    pad_id: int = 0,
    share_prefix: bool = True,
) -> Packed:
    """The packed layout of a right-padded batch [B, T].

    groups: rows that share a prompt (a pair's chosen and rejected, a prompt's rollouts); their longest common
        prefix is laid out once when `share_prefix`. Rows in no group stand alone.
    max_tokens: the most slots a bin holds (`train.micro_batch_tokens`); None: one bin.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"need input_ids and attention_mask [B, T], got {input_ids.shape}, {attention_mask.shape}")
    lengths = (attention_mask != 0).sum(dim=1).tolist()
    rows = [input_ids[b, :n].cpu() for b, n in enumerate(lengths)]
    units = _units(rows, groups if share_prefix else None)
    sizes = [p + sum(lengths[i] - p for i in members) for members, p in units]
    bins = _bins(sizes, max_tokens)
    width = max(sum(sizes[u] for u in b) for b in bins)

    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    slot = torch.full(tuple(input_ids.shape), -1, dtype=torch.long)
    layout: list[list[Unit]] = []
    for k, b in enumerate(bins):
        at, placed = 0, []
        for u in b:
            members, p = units[u]
            start, branches = at, []
            ids[k, at : at + p], pos[k, at : at + p] = rows[members[0]][:p], torch.arange(p)
            for i in members:
                slot[i, :p] = k * width + at + torch.arange(p)
            at += p
            for i in members:
                n = lengths[i] - p
                ids[k, at : at + n], pos[k, at : at + n] = rows[i][p:], torch.arange(p, lengths[i])
                slot[i, p : lengths[i]] = k * width + at + torch.arange(n)
                branches.append((at, n))
                at += n
            placed.append((start, p, branches))
        # the bin's padding: positions counting on from 0 (a sequence of its own, never scored)
        pos[k, at:] = torch.arange(width - at)
        layout.append(placed)
    device = input_ids.device
    return Packed(
        input_ids=ids.to(device),
        position_ids=pos.to(device),
        slot=slot.to(device),
        units=layout,
        tokens=int(sum(sizes)),
    )


def pair_groups(n: int) -> list[list[int]]:
    """Groups of a pair batch laid out as n chosen rows then n rejected rows."""
    return [[i, n + i] for i in range(n)]


def key_groups(keys: list[object]) -> list[list[int]]:
    """Rows with equal keys (a GRPO group's id) as groups, in order of first appearance."""
    out: dict[object, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


def args(cfg: Any) -> dict[str, Any] | None:
    """`pack`'s arguments from a run's `train.packing`, `train.micro_batch_tokens` and `train.share_prompts`;
    None when the run pads."""
    t = cfg.train
    return {"max_tokens": t.micro_batch_tokens, "share_prefix": t.share_prompts} if enabled(t) else None


# `train.packing: auto` on CPU: a packed step costs more than a padded one (its gathers and scatters around every
# layer's attention) until the padding it removes is at least this share of the padded tokens. SmolLM2-135M on 2
# cores (bench/packing_real.py, bench/packing.py --model smollm2 [--no-group]; the numbers are in docs/results.md).
CPU_BREAK_EVEN = 0.17


def choose(train: Any, padding_share: float | None) -> tuple[bool, str]:
    """Whether a run packs, and why, in words for its log. `train.packing: true | false` as given; `auto`: packed
    on a GPU (the padding-free layout the design is for; not yet measured against padded on one), and on CPU only
    when `padding_share` (the share of a padded micro-batch's tokens that are padding, from the plan; None: not
    known before the run, e.g. rollouts) reaches `CPU_BREAK_EVEN`."""
    p = train.packing
    if isinstance(p, bool):
        return p, f"train.packing: {str(p).lower()}"
    if train.use_gpu:
        return True, "train.packing auto: packed on GPU"
    if padding_share is None:
        return False, (f"train.packing auto: padded on CPU (the padding share is not known before the run; "
                       f"packing pays from {CPU_BREAK_EVEN:.0%} up)")  # fmt: skip
    verdict = "packed" if padding_share >= CPU_BREAK_EVEN else "padded"
    return verdict == "packed", (f"train.packing auto: {verdict} on CPU: the plan's micro-batches are "
                                 f"{padding_share:.0%} padding; packing pays on CPU from {CPU_BREAK_EVEN:.0%} up")  # fmt: skip


def enabled(train: Any) -> bool:
    """Whether a run packs: the driver's decision (`choose`, written into `train.packing`), or where no driver
    decided (a method that does not, a reference pass on its own) the one made without a padding share."""
    return choose(train, None)[0]


# ---------------------------------------------------------------------------------------------------------
# Attention by segments: each row (each prefix and branch) attends over its own keys only, so a packed forward
# costs the rows' attention (each padded to the micro-batch's longest row, as a padded batch's is), not the square
# of the whole sequence that a mask over it would cost; one kernel call per layer for all of them (a Python loop
# of one call per row cost more than the padding packing removes, on CPU).

SEGMENT_ATTENTION = "uft_ray_segments"


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (`AttentionInterface`): with `packed_layout` (a `Packed`) among the
    forward's kwargs, one scaled dot-product attention call over the layout's segments (`Packed.segments`: its
    rows gathered into a right-padded batch, scattered back after); without, transformers' own sdpa.

    query [K, H, L, D], key / value [K, Hkv, L, D]; returns [K, L, H, D] as transformers' functions do. A prefix
    attends causally to itself; a branch to its whole prefix and causally to itself; a bin's padding gets zeros
    (no scored token reads it)."""
    import torch.nn.functional as F

    layout: Packed | None = kwargs.pop("packed_layout", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    window = kwargs.get("sliding_window")
    seg = layout.segments()
    if window is not None and seg.longest_keys > window:
        raise ValueError(f"a packed row of {seg.longest_keys} tokens exceeds the sliding window ({window}): set "
                         f"train.packing: false for this model")  # fmt: skip
    bins, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    n_seg, q_len = seg.q_index.shape

    def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[K, h, L, D] -> [S, h, n, D]: the slots `index` [S, n] of x, as a batch of segments."""
        flat = x.transpose(1, 2).reshape(bins * width, x.shape[1], dim)
        return flat.index_select(0, index.flatten()).view(*index.shape, x.shape[1], dim).transpose(1, 2)

    q, k, v = rows(query, seg.q_index), rows(key, seg.k_index), rows(value, seg.k_index)
    # One call for every row of the micro-batch: causal over right-padded segments (padding keys come after every
    # real query), or with the prefix mask when branches share prompts.
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=seg.mask,
        dropout_p=dropout,
        is_causal=seg.mask is None,
        scale=scaling,
        enable_gqa=heads != kv_heads,
    )
    out = out.transpose(1, 2).reshape(n_seg * q_len, heads, dim)[seg.written]
    flat = out.new_zeros(bins * width, heads, dim).index_copy(0, seg.out_index, out)
    return flat.view(bins, width, heads, dim), None


def register_segment_attention() -> str:
    """Make `SEGMENT_ATTENTION` a name transformers accepts as `attn_implementation` (in this process), with
    sdpa's masks for forwards that are not packed. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return SEGMENT_ATTENTION


def attn_implementation(configured: str, packing: bool) -> str:
    """The attention a model is loaded with: `sdpa` becomes the segment attention when the run packs (the same
    kernel, run per row); eager and flash_attention_2 stay (masks / flash-attention's variable-length kernels)."""
    return register_segment_attention() if packing and configured == "sdpa" else configured


def forward_kwargs(model: Any, packed: Packed) -> dict[str, Any]:
    """The model-call arguments of a packed forward: position ids, and either the layout (segment attention), a
    4D mask (eager with shared prompts) or no mask (the position ids restarting say it: sdpa, eager, flash)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION:
        # A 4D mask reaches the attention as it is: an empty one stops transformers from building an [L, L] mask
        # that segment attention would not read.
        empty = torch.zeros(packed.input_ids.shape[0], 1, 0, 0, dtype=torch.bool, device=packed.input_ids.device)
        return {"position_ids": packed.position_ids, "attention_mask": empty, "packed_layout": packed}
    dtype = _activation_dtype(model)
    return {"position_ids": packed.position_ids, "attention_mask": packed.attention_mask(dtype)}


def _activation_dtype(model: Any) -> torch.dtype:
    """The dtype of the model's activations (its input embeddings' weight; DeepSpeed's bf16 module is bf16)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
