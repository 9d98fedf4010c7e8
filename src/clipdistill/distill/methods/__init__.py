"""Every distillation method, one file each; importing this package registers them all."""
