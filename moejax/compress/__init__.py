"""Post-training compression of a run's MoE layers: calibration (`calibrate`), expert pruning
(`prune`: frequency, gate mass, EASY-EP) and Sub-MoE expert merging (`merge`), each writing a
new run directory (`python -m moejax.compress prune|merge`, `moejax/compress/__main__.py`).
Judged with `moejax.eval`."""

from moejax.compress.calibrate import Calibration, LayerCalibration, calibrate
from moejax.compress.merge import merge, plan_merge
from moejax.compress.prune import prune, select

__all__ = ["Calibration", "LayerCalibration", "calibrate", "merge", "plan_merge", "prune", "select"]
