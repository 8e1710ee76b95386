"""The evaluation tool: ``spikekernels.evaluate(...)`` and ``python -m spikekernels.evaluate``.

Evaluates a QANN and its converted SNN on a dataset: top-1 of the float network, the QANN and
the SNN, SNN accuracy after every time step, steps to silence, SNN/QANN agreement, SOPs
(spikes x fan-out, +1 and -1 alike) and dense work per layer counted on the device during
the run, MACs of the QANN, estimated energy of both, images/s, optionally ``parity``; writes
results.json and PNG plots. Runs sharded under ``torchrun``. See ``evaluation.evaluate``.

Files: ``evaluation.py`` (the run), ``model.py`` (which QANN), ``data.py`` (ImageFolder and
digits), ``sops.py`` (counting, energy tables), ``distributed.py`` (torchrun), ``results.py``
(merge and atomic write), ``plots.py``, ``__main__.py`` (the command line).
"""

import sys
import types

from spikekernels.evaluate.evaluation import evaluate

__all__ = ["evaluate"]


class _CallableModule(types.ModuleType):
    """``spikekernels.evaluate`` is both this package (``python -m``) and the function:
    importing the package binds the name to the module, so the module calls through."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
