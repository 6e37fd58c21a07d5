"""Mask rules against dense masks written straight from the spec's definitions (section 1.2)."""

import jax.numpy as jnp
import numpy as np
import pytest

from tradojax.ops import masks
from tradojax.ops.masks import BlockAlignment, MaskRule, Segments


def spec_training_mask(prompt_tokens: np.ndarray, l1: int, b: int, pad_id: int) -> np.ndarray:
    """The original's `make_basic_block_attention` + `process_pad`, transcribed from spec 1.2(b)."""
    batch, l0 = prompt_tokens.shape
    n = l0 + 2 * l1
    out = np.zeros((batch, n, n), bool)
    base = np.zeros((n, n), bool)
    for i in range(l0):
        k = (l0 - 1 - i) // b
        base[i, : l0 - k * b] = True
    for r in range(l1):
        blk = r // b
        base[l0 + r, : l0 + min((blk + 1) * b, l1)] = True
        row = l0 + l1 + r
        base[row, : l0 + blk * b] = True
        start = l0 + l1 + blk * b
        base[row, start: start + b] = True
    for s in range(batch):
        m = base.copy()
        pad_cols = np.where(prompt_tokens[s] == pad_id)[0]
        m[:, pad_cols] = False
        for i in range(l0):
            if not m[i].any():
                m[i, i] = True
        out[s] = m
    return out


@pytest.mark.parametrize("l0,l1,b", [(7, 8, 4), (8, 6, 4), (5, 9, 2), (12, 16, 8), (3, 5, 1)])
def test_dual_stream_mask_equals_spec_definition_with_left_pads(l0, l1, b):
    rng = np.random.default_rng(l0 * 100 + l1 * 10 + b)
    pad_id = 0
    batch = 4
    prompt = rng.integers(1, 50, size=(batch, l0))
    pads = [0, l0 - 1, 2 % l0, l0 // 2]  # left pads per row, including all-but-one pad
    for s, p in enumerate(pads):
        prompt[s, :p] = pad_id
    block, kind, valid, _ = masks.training_segments(prompt != pad_id, l1, b, BlockAlignment.ORIGINAL)
    segments = Segments(jnp.asarray(block), jnp.asarray(kind), jnp.asarray(valid))
    ours = np.asarray(masks.dense_mask(MaskRule.BLOCK_DIFFUSION, segments, segments, self_attention=True))
    np.testing.assert_array_equal(ours, spec_training_mask(prompt, l1, b, pad_id))
    # the O(T) fallback flags agree with the dense definition
    pairwise = np.asarray(masks.dense_mask(MaskRule.BLOCK_DIFFUSION, segments, segments, self_attention=False))
    np.testing.assert_array_equal(np.asarray(masks.self_only(MaskRule.BLOCK_DIFFUSION, segments)),
                                  ~pairwise.any(-1))


def test_training_positions_follow_spec_cumsum_and_noisy_copy_reuses_clean():
    prompt_valid = np.array([[False, False, True, True, True], [True] * 5])
    _, _, _, positions = masks.training_segments(prompt_valid, 3, 4, BlockAlignment.ORIGINAL)
    np.testing.assert_array_equal(positions[0], [0, 0, 0, 1, 2, 3, 4, 5, 3, 4, 5])
    np.testing.assert_array_equal(positions[1], [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7])


def test_inference_block_causal_rule_is_per_sequence_aligned():
    # one sequence left-padded by 3: its blocks start at its own first token
    b = 4
    valid = np.array([[False] * 3 + [True] * 9])
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    seg = masks.inference_segments(jnp.asarray(positions), jnp.asarray(valid), b)
    mask = np.asarray(masks.dense_mask(MaskRule.BLOCK_DIFFUSION, seg, seg, self_attention=True))[0]
    for i in range(3, 12):
        for j in range(12):
            expected = j >= 3 and (j - 3) // b <= (i - 3) // b
            assert mask[i, j] == expected, (i, j)
    assert not mask[:, :3].any()  # nobody sees a pad


def test_inference_alignment_training_blocks_match_decode_blocks():
    """With INFERENCE alignment a response token's block is the block the sampler decoded it in,
    and a noisy token sees the prompt residual that shares its first block."""
    b, l1 = 4, 6
    prompt_valid = np.array([[False, True, True, True, True, True]])  # P = 5: residual of 1
    block, kind, valid, positions = masks.training_segments(prompt_valid, l1, b, BlockAlignment.INFERENCE)
    l0 = 6
    np.testing.assert_array_equal(block[0, l0:l0 + l1], (5 + np.arange(l1)) // b)
    seg = Segments(jnp.asarray(block), jnp.asarray(kind), jnp.asarray(valid))
    mask = np.asarray(masks.dense_mask(MaskRule.BLOCK_DIFFUSION, seg, seg, self_attention=True))[0]
    first_noisy = l0 + l1  # response token 0 (position 5, block 1)
    assert mask[first_noisy, l0 - 1]  # the residual prompt token (position 4, block 1)
    assert not mask[first_noisy, l0]  # not its own clean copy
    assert mask[first_noisy, first_noisy + 2] and not mask[first_noisy, first_noisy + 3]  # own noisy block only


def test_full_rule_sees_every_valid_key():
    valid = jnp.array([[False, True, True, True]])
    seg = masks.full_segments(valid)
    mask = np.asarray(masks.dense_mask(MaskRule.FULL, seg, seg, self_attention=True))[0]
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1]] * 4)
