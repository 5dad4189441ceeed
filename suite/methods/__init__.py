"""The method SDK: the one import surface for method authors (`from suite.methods import ...`).

The Pruner contract and registry, scoring and selection, activation and gradient capture, layer-wise
reconstruction, OBS, and the mask-learning engine, plus the model anatomy and data types a method touches. The
built-in methods in `baselines/` and `ddp/` import nothing else from suite, and neither should a plugin.
"""

from suite.atomic import locked, replacing_file
from suite.data.calibration import Calibration
from suite.data.sources import cache_dir
from suite.errors import ConfigError
from suite.methods.capture import (
    InputStats,
    add_output_bias,
    consumer_weight,
    gradients,
    remove_units,
    taylor_scores,
    unit_columns,
    walk,
)
from suite.methods.layerwise import LayerwiseConfig, LayerwisePruner, closest_count, closest_removal, removal_goals
from suite.methods.mask_learning import MaskLearner, MaskLearningConfig, Relaxation, rank_masks, sparsity_weights
from suite.methods.obs import refit_alive, removal_order, removal_path
from suite.methods.pruner import (
    MethodConfig,
    Pruner,
    PruneResult,
    ScorePruner,
    SelectionConfig,
    calibration_ids,
    get_method,
    methods,
    register,
)
from suite.model.compact import stock_widths
from suite.model.families import decoder_layers
from suite.model.gates import Gates
from suite.model.loss import next_token_nll
from suite.model.masks import Masks, Target, select
from suite.model.modules import eval_mode, model_device
from suite.model.structures import Group, Structure, unit_sum

__all__ = [
    "Calibration",
    "ConfigError",
    "Gates",
    "Group",
    "InputStats",
    "LayerwiseConfig",
    "LayerwisePruner",
    "MaskLearner",
    "MaskLearningConfig",
    "Masks",
    "MethodConfig",
    "PruneResult",
    "Pruner",
    "Relaxation",
    "ScorePruner",
    "SelectionConfig",
    "Structure",
    "Target",
    "add_output_bias",
    "cache_dir",
    "calibration_ids",
    "closest_count",
    "closest_removal",
    "consumer_weight",
    "decoder_layers",
    "eval_mode",
    "get_method",
    "gradients",
    "locked",
    "methods",
    "model_device",
    "next_token_nll",
    "rank_masks",
    "refit_alive",
    "register",
    "removal_goals",
    "removal_order",
    "removal_path",
    "remove_units",
    "replacing_file",
    "select",
    "sparsity_weights",
    "stock_widths",
    "taylor_scores",
    "unit_columns",
    "unit_sum",
    "walk",
]
