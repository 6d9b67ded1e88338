"""The commands end to end, one module per command as in ``cli/`` (paper section 3 for synth and segment, 4 for
eval, 4.5 for explain).

- :mod:`.synth`: ``synth``: support set -> attribution -> masks -> features -> prototype bank, through the cache
  (paper 3.2-3.3); owns the "bank" cache stage. Its support stages ("support", "proposals") are in
  :mod:`.support`, their cache keys and versions in :mod:`.keys`.
- :mod:`.segment`: ``segment``: prototype banks (synthesised first where missing) -> eq. 4 over a list of files ->
  label maps, overlays and scores (paper 3.4); its segmenter also serves ``explain`` and ``eval``.
- :mod:`.eval`: ``eval``: the same segmentation over a benchmark's images -> confusion matrices per seed (paper 4).
- :mod:`.common`: the progress protocol and the in-order background worker the commands share.

The names below are the package's public API, re-exported for library users, tests and benchmarks; the CLI
imports each from its own module. Patch a name in the module that uses it, not here.
"""

from .common import InOrder, Progress
from .eval import EvalRun, check_save_pred, eval_context, evaluate, evaluate_seeds, score_predictions
from .keys import (
    BANK_VERSION,
    PROPOSALS_VERSION,
    SUPPORT_VERSION,
    SynthOptions,
    bank_key,
    batch_size,
    class_keys,
    effective_masker,
    masker_note,
    support_key,
)
from .segment import (
    OutputPlan,
    SegmentRun,
    build_segmenter,
    iter_segmentations,
    plan_outputs,
    prefilter_clip,
    segment_files,
    segment_roles,
    writes_in_background,
)
from .support import encode_support, ensure_support, load_support, support_image, support_masks, support_tensors
from .synth import (
    CachedBank,
    ClassResult,
    build_class_bank,
    cached_banks,
    missing_banks,
    support_size_note,
    synthesis_notes,
    synthesize,
)

__all__ = [
    "BANK_VERSION",
    "PROPOSALS_VERSION",
    "SUPPORT_VERSION",
    "CachedBank",
    "ClassResult",
    "EvalRun",
    "InOrder",
    "OutputPlan",
    "Progress",
    "SegmentRun",
    "SynthOptions",
    "bank_key",
    "batch_size",
    "build_class_bank",
    "build_segmenter",
    "cached_banks",
    "check_save_pred",
    "class_keys",
    "effective_masker",
    "encode_support",
    "ensure_support",
    "eval_context",
    "evaluate",
    "evaluate_seeds",
    "iter_segmentations",
    "load_support",
    "masker_note",
    "missing_banks",
    "plan_outputs",
    "prefilter_clip",
    "score_predictions",
    "segment_files",
    "segment_roles",
    "support_image",
    "support_key",
    "support_masks",
    "support_size_note",
    "support_tensors",
    "synthesis_notes",
    "synthesize",
    "writes_in_background",
]
