"""Evaluation and export of pretrained backbones (pure PyTorch; no Ray or MLflow imports).

- ``knn``: weighted kNN monitor (``knn_predict``, ``knn_accuracy``)
- ``features``: frozen feature extraction and an on-disk feature cache
- ``linear``: the linear-probe trainer and its protocols (``train_probe``, ``LinearProtocol``, ``train_lincls``)
- ``probe_sources``: what the probe trains on (``CachedFeatures``; ``FreshViews`` through a frozen backbone)
- ``export``: torchvision state dict, TorchScript and detectron2 formats; loading an exported state dict

Import the submodules directly; this package imports nothing so that ``import moco_ray.evaluation`` stays cheap.
"""
