"""Every distillation method, one file each; importing this package registers them all."""

from clipdistill.distill.methods import clip, clipkd, conaclip, openclip  # noqa: F401
