"""2D segmentation (notebook 06), one job per module; training, folds, scores and export are the shared stages.

* ``data``: readers and loaders (TRUS, MS-lesion MRI, CT organs) -> ``RawSet``; axial slices by the affine.
* ``preprocess``: crop to the field of view, scale, denoise, resize (numpy/scipy/SimpleITK, no torch).
* ``dataset``: a ``RawSet`` prepared into a ``lib.datasets.CachedDataset`` (task ``segmentation``), joint
  image/mask augmentation (``lib.datasets.make_augment``) and lesion-aware patches.
* ``model``: networks by name and the Dice + BCE losses.
* ``train``: one fold through ``lib.train.fit``; grouped k-fold through ``lib.kfold.run_kfold``, scored by
  ``lib.metrics`` (Dice/IoU, CIs resampling patients); the denoising ablation.
* ``infer``: a trained segmenter (checkpoint or ONNX export) applied to images, files and folders; torch is
  imported only for a torch model, so the service's ``POST /segment`` on an ONNX export stays torch-free.
* ``onnx_export``: fold checkpoints -> one ONNX graph through ``lib.export.export_model``.
* ``plots``: the notebook's figures and case picks.
* ``__main__``: ``python -m lib.segmentation predict|export``.

Dice convention: an image whose truth and prediction are both empty scores Dice = IoU = 1; empty truth with a
non-empty prediction scores 0 (``lib.metrics.dice_iou``). ``dice_pos`` is the Dice over images with a lesion.
"""
