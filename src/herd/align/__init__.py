"""Alignment (paper §4): reward models, rejection sampling, DPO and the rounds that chain
them (`herd align`)."""
