"""Training, above the core: one loop (``loop``: its stop policy in ``stop``, checkpoints in ``checkpoint``, resume
checks in ``resume``, per-sample random draws in ``draws``) and the tasks it runs (``stage1``, ``stage2``, ``lm``),
each told how to train by a named recipe (``recipes``). Tasks take their evaluators from the caller, so nothing
here knows which world the data comes from.
"""
