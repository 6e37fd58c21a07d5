"""Pallas attention kernels: TPU (Mosaic), GPU (Pallas Triton), interpret mode anywhere.

* `segment.flash_attention`: self-attention under a mask rule over per-token `Segments`
  (training `[prompt | clean | noisy]`, block-causal prefill, full), with tile skipping and a
  flash backward pass (`custom_vjp`).
* `decode.decode_attention`: the cached block-diffusion decode step (block queries against the
  KV cache up to each sequence's length, plus the block's own keys).
* `dispatch`: what `ops.attention` calls for impl="pallas" (backend choice, shard_map on meshes,
  the self-attention fallback for rows that see nothing).

The kernels take mask parameters, never models; `ops.attention` holds the einsum references.
"""
