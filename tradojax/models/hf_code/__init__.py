"""`transformers` remote code shipped next to exported SDAR checkpoints (needs torch; never imported by tradojax)."""
