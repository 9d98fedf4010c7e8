"""Every distillation method, one file each; importing this package registers them all."""

from clipdistill.distill.methods import clip, clipkd, comkd, conaclip, dcd, mcad, openclip  # noqa: F401
