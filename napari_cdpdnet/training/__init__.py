"""Training, fine-tuning and evaluation of CDPDNet on partially labelled data (issue 7).

Submodules import torch (and MONAI for :mod:`~napari_cdpdnet.training.data`); importing this
package alone does not. ``loss`` holds the official masked BCE + Dice, ``schedule`` the official
warm-up/cosine rate, ``config`` the training config file, ``data`` the MONAI training transforms,
``trainer`` the loop (DDP under torchrun, AMP on CUDA, official checkpoints), ``evaluation`` Dice
and HD95 in mm: what ``cdpdnet train`` and ``cdpdnet evaluate`` need. The partial-label vs naive
demonstration on real CT is an experiment built on these, in ``scripts/train_demo.py``.
"""
