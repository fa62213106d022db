"""Training, above the core: one loop (``loop``) and the tasks it runs (``stage1``, ``stage2``, ``lm``), each told
how to train by a named recipe (``recipes``). Tasks take their evaluators from the caller, so nothing here knows
which world the data comes from.
"""
