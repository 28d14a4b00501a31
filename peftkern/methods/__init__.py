"""Training-time algorithms built on the ops (AdaLoRA allocator, ...)."""
