"""Model sets (registry, specs) and their loaders. Importing this package does not import torch."""

from .registry import (
    MODEL_SETS,
    ROLES,
    Component,
    ModelSetSpec,
    ModelUnavailable,
    component_hash,
    list_model_sets,
    register_model_set,
    resolve_models,
)

__all__ = [
    "MODEL_SETS",
    "ROLES",
    "Component",
    "ModelSetSpec",
    "ModelUnavailable",
    "component_hash",
    "list_model_sets",
    "register_model_set",
    "resolve_models",
]
