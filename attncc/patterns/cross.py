"""Grouped cross attention (Flamingo, Alayrac et al. 2022: gated cross attention to the media
that precedes a text token): query token i attends kv token j iff they belong to the same group.

    mask(b, q, kv) = q_groups[q] == kv_groups[kv] and q_groups[q] >= 0

Group ids are per token: `q_groups` int [Q_LEN] for the queries (text tokens), `kv_groups` int
[KV_LEN] for the keys (media tokens, e.g. the visual tokens of each image); either may be
[B, len] for ids that differ per sequence of the batch. A negative query id matches nothing
(text before the first image attends no media: its output is zeros and its lse -inf, as
Flamingo's tanh-gated cross attention then contributes nothing). Q_LEN and KV_LEN are
independent. For Flamingo's "the image just before this text token", with `is_image` marking the
positions of the <image> tags in the text and images numbered in order of appearance:

    q_groups = torch.cumsum(is_image, 0) - 1     # -1 before the first image
    kv_groups = torch.arange(num_images).repeat_interleave(tokens_per_image)
"""
import torch

from ..dsl.pattern import Pattern


def _check_ids(name: str, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ValueError(f"{name} must be int [len] or [B, len], got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer group ids, got {ids.dtype}")
    return ids


def cross(q_groups, kv_groups) -> Pattern:
    """mask = q_groups[q] == kv_groups[kv] and q_groups[q] >= 0 (ids [len] or [B, len])."""
    q_groups, kv_groups = _check_ids("q_groups", q_groups), _check_ids("kv_groups", kv_groups)
    q_batched, kv_batched = q_groups.dim() == 2, kv_groups.dim() == 2

    def cross_mask(b, h, q, kv):
        qg = q_groups[b, q] if q_batched else q_groups[q]
        kg = kv_groups[b, kv] if kv_batched else kv_groups[kv]
        return (qg == kg) & (qg >= 0)

    return Pattern(cross_mask, name="cross")
