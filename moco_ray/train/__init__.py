"""Ray Train orchestration of the MoCo loop (thin: the math lives in moco_ray.core)."""
