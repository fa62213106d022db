"""The shapes world: exact captions, so every stage of VLV is measured exactly on a CPU.

``world`` (scenes, rendering, captions, the detector, scores), ``data`` (image-caption folders of scenes),
``tokenizers`` (the teacher's and the LM's), ``teacher`` (the shapes text-to-image model in Stable Diffusion's
layout), ``metrics`` (evaluators the training tasks are given), ``demo``, ``evaluate`` and ``report``.
Nothing in vlv's core imports this package.
"""
