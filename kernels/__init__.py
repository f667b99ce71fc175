"""Attention kernels, each beside its plain-PyTorch reference (see ``../shared/DESIGN.md``)."""
