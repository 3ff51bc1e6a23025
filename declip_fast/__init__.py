"""declip_fast: fast, memory-lean DeCLIP and CLIP pretraining."""

__version__ = "0.1.0"
