"""Search spaces: one YAML file per stage (data, not code) and the loader that turns a
space into ``trial.suggest_*`` calls.
"""

from search_spaces._space import (
    Param,
    SearchSpace,
    SearchSpaceError,
    grid_points,
    load,
    params_of,
    probes,
    suggest,
)

__all__ = [
    "Param",
    "SearchSpace",
    "SearchSpaceError",
    "grid_points",
    "load",
    "params_of",
    "probes",
    "suggest",
]
