"""The official scripts' checkpoint loading, transcribed: what an exported ``moco`` / ``deit`` file must satisfy.

Each function is the code of the file it names, as written there (only wrapped in a function): the key renaming
and the ``missing_keys`` assertion of facebookresearch/moco main_lincls.py and facebookresearch/moco-v3
main_lincls.py, and moco-v3 convert_to_deit.py. They change ``checkpoint["state_dict"]`` in place, as the scripts do.
"""

from __future__ import annotations

import torch.nn as nn


def moco_main_lincls(checkpoint: dict, model: nn.Module) -> None:
    """facebookresearch/moco main_lincls.py, "load from pre-trained" (the --pretrained branch)."""
    # rename moco pre-trained keys
    state_dict = checkpoint["state_dict"]
    for k in list(state_dict.keys()):
        # retain only encoder_q up to before the embedding layer
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            # remove prefix
            state_dict[k[len("module.encoder_q.") :]] = state_dict[k]
        # delete renamed or unused k
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}


def mocov3_main_lincls(checkpoint: dict, model: nn.Module, linear_keyword: str) -> None:
    """facebookresearch/moco-v3 main_lincls.py, the --pretrained branch (``linear_keyword``: 'head' for a ViT,
    'fc' for a torchvision model, as main_lincls.py sets it)."""
    # rename moco pre-trained keys
    state_dict = checkpoint["state_dict"]
    for k in list(state_dict.keys()):
        # retain only base_encoder up to before the embedding layer
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.%s" % linear_keyword):  # noqa: UP031
            # remove prefix
            state_dict[k[len("module.base_encoder.") :]] = state_dict[k]
        # delete renamed or unused k
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"%s.weight" % linear_keyword, "%s.bias" % linear_keyword}  # noqa: UP031


def convert_to_deit(checkpoint: dict) -> dict:
    """facebookresearch/moco-v3 convert_to_deit.py: the object it saves, ``{'model': state_dict}``."""
    state_dict = checkpoint["state_dict"]
    for k in list(state_dict.keys()):
        # retain only base_encoder up to before the embedding layer
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.head"):
            # remove prefix
            state_dict[k[len("module.base_encoder.") :]] = state_dict[k]
        # delete renamed or unused k
        del state_dict[k]
    return {"model": state_dict}
