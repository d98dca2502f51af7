"""``python -m qtrain``: the command line; ``torchrun --nproc-per-node N -m qtrain ...`` starts N
data-parallel processes of it (:mod:`qtrain.distributed`)."""

from .cli import entry

entry()
