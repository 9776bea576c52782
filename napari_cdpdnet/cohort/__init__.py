"""Cohort runs: ``cdpdnet segment`` over thousands of CTs, on one or many devices, resumable.

Built on PyTorch's own machinery, not a scheduler of ours: ``torchrun`` starts one process per
device (and across nodes, with a rendezvous), ``torch.distributed`` hands every rank the same
plan, ``torch.utils.data.DataLoader`` workers read and preprocess ahead of the device.

* :mod:`.inputs` — cases from files, folders (recursively: CT files and DICOM series), globs and
  manifests; outputs mirroring the input tree; cost estimates for balancing.
* :mod:`.sharding` — this process's rank and shard (torchrun, ``--shard K/N``, Slurm arrays) and
  the size-balanced split.
* :mod:`.outputs` — when a case is done (its complete output set, the label table written last).
* :mod:`.plan` — the run's plan, made once before anything is computed.
* :mod:`.loading` — the CPU stage as a DataLoader.
* :mod:`.runner` — the device loop, the writer thread, clean stops.
* :mod:`.report` — per-rank logs and the merged ``run.json`` / ``run.csv``.

Sits on :mod:`napari_cdpdnet.inference`, :mod:`napari_cdpdnet.export` and :mod:`napari_cdpdnet.io`;
imports torch only in :mod:`.loading` and :mod:`.runner`.
"""
