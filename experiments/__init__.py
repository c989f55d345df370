"""The shipped experiment files, installed as the package data of ``moco_ray.experiments`` (pyproject.toml maps this
folder there), so ``moco-ray pretrain -c NAME`` finds them from any directory: see ``moco_ray/config_files.py``."""
