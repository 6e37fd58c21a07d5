"""SFT (spec section 5): block and trace SFT for block-diffusion models, semi-AR, random-masking and
trace SFT for full-attention models, length buckets, exact resume, sharding, block-size adaptation.

Modules: `config` (SFTConfig: modes and options), `rows` (single-stream rows of LLaDA/Dream),
`losses` (their loss), `batches` (length buckets, the seeded batch schedule), `trainer`
(SFTTrainer, sft_rows), `data` (pairs from SFT files or synthetic tasks), `commands` (`tradojax sft`).
"""
