"""Image-caption data: one module per thing it holds, each a core module (nothing of training or the shapes world).

- :mod:`vlv.data.records`: the ``captions.jsonl`` format of a folder.
- :mod:`vlv.data.images`: reading a user's image, and the pixel conventions every reader shares
  (centre square crop + bicubic, or the official code's crop, uint8 RGB; tensors in [-1, 1]).
- :mod:`vlv.data.transforms`: an encoder's image transform, image -> pixel_values (the crop, then the pixels).
- :mod:`vlv.data.datasets`: :class:`~vlv.data.datasets.Dataset`, one random-access interface over folders, tar
  shards, parquet, and a dataset decoded into memory (:class:`~vlv.data.datasets.InMemory`).
- :mod:`vlv.data.sampling`: which samples step k of rank r reads (:func:`~vlv.data.sampling.step_indices`).
- :mod:`vlv.data.loader`: those batches read and decoded in DataLoader workers.
- :mod:`vlv.data.shards`: the index of a tar shard, and writing a dataset as shards.
- :mod:`vlv.data.caches`: keyed caches of what is frozen (VAE posteriors, vision features).
"""
