"""PyTorch reference model, codecs, checkpoint I/O and training (needs the ``torch`` extra)."""
