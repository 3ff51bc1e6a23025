"""torch.distributed helpers: gathers with gradient, FSDP2 application."""
