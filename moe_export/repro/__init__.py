"""The experiments behind `moe-export reproduce` and docs/results.md.

synthetic.py   the theory's data model, two-layer MoE and SGD training
experiments.py the synthetic sweep (alpha x seeds x routing; allocations at equal average bits)
zoo_sweep.py   plan methods x average bits x build seeds on zoo models, plus repeat/control fine-tunes
report.py      results.md and its plots, rebuilt from the saved records alone
"""
