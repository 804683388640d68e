"""Prompt learning as a library: the recipe (``LearnRecipe``), one learning step with its warm start and
temperature calibration (``PromptLearner``), few-shot learning from a handful of labelled images on cached
image features (``learn_prompts``), and the fit of GPR's reading of the features after learning (``fit_gpr``,
``calibrate_shifted_gpr``). ``training.train_prompts`` (datasets, DDP, checkpoints, resume) and the demo's Learn
tab both run this code.
"""
from .fewshot import (FewShotResult, FewShotSettings, LabelledImage, LearnProgress, encode_examples,
                      learn_prompts, segmentation_miou)
from .gpr_fit import GPRFitSettings, calibrate_shifted_gpr, fit_gpr
from .learner import PromptLearner, calibrate_temperatures, fit_to_templates
from .recipe import DEFAULT, OPTIMIZERS, PAPER, LearnRecipe, build_optimizer

__all__ = ["GPRFitSettings", "calibrate_shifted_gpr", "fit_gpr",
           "FewShotResult", "FewShotSettings", "LabelledImage", "LearnProgress", "encode_examples", "learn_prompts",
           "segmentation_miou",
           "PromptLearner", "calibrate_temperatures", "fit_to_templates", "DEFAULT", "OPTIMIZERS", "PAPER",
           "LearnRecipe", "build_optimizer"]
