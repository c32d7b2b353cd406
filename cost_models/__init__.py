"""Per-family learned cost models over an analytic prior, composed into step time and memory."""
