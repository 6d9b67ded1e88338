"""Every default of the pipeline, in one place.

Values come from the paper (sections 3 and 4) and, where the paper is silent, from the authors' public code as
recorded in the design card. Library functions take these as keyword defaults; the CLI passes only what the
user set, so changing a default here changes it everywhere.
"""

from __future__ import annotations

# --- 3.2 support set -------------------------------------------------------------------------------------------
PROMPT_TEMPLATE = "A good picture of a {}"
NEGATIVE_PROMPT = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
N_SUPPORT = 32
STEPS = 30
GUIDANCE = 8.0
SEED = 42
# Images are generated in fixed-shape batches of this size (the last one padded) so that an image's bytes never
# depend on which other images shared its batch.
BATCH_SIZE = 8

# --- 3.3 attribution + masks ------------------------------------------------------------------------------------
MASKER = "auto"
MASKCUT_TAU = 0.15  # affinity threshold of the normalised cut (CutLER's MaskCut)
MASKCUT_N_MASKS = 3  # proposals per image
THRESHOLD_FALLBACK_BG = 0.2  # "-CutLER" variant when multi-Otsu cannot split the maps
THRESHOLD_FALLBACK_FG = 0.5
BG_ATTRIBUTION_MAX = 0.2  # bg mask keeps only pixels whose attribution is below this
BG_ERODE_PX = 1

# --- 3.3 prototypes ---------------------------------------------------------------------------------------------
EXTRACTORS = ("sd", "dino", "clip")
K_PARTS = 32
KMEANS_ITERS = 50
KMEANS_SEED = 0

# --- 4.1 extractors ---------------------------------------------------------------------------------------------
SD_FEATURE_TIMESTEP = 200
SD_FEATURE_NOISE_SEED = 0

# --- 3.4 segmentation -------------------------------------------------------------------------------------------
SCALES = (448, 336)  # square sliding-window sizes (pixels of the resized image)
STRIDE = 224
SHORT_SIDE = 448  # images are resized so their short side is this before windowing
BACKGROUND = True  # False = the no-background protocol of paper 4.4 (no bg prototypes)
SEGMENT_BATCH_SIZE = 8  # windows per network forward (fixed shape, last batch padded)
OVERLAY_ALPHA = 0.5  # weight of the label colours in overlays
MAX_PIXELS = 100_000_000  # decompression-bomb guard for inputs (a 12000 x 8000 photo is 96 megapixels)

# --- 3.4 filters ------------------------------------------------------------------------------------------------
PREFILTER = True
ETA = 10  # the CLIP pre-filter keeps at most this many classes, then scores all their subsets
PREFILTER_TEMPLATE = "a {}"  # one class in a pre-filter prompt; subsets join these with PREFILTER_JOIN
PREFILTER_JOIN = " and "
STUFF_THRESHOLD = 0.85  # thing-class bg prototypes this similar to a stuff prototype are dropped
PAMR = False
PAMR_ITERS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)

# --- 4.5 explanations -------------------------------------------------------------------------------------------
EXPLAIN_TOP = 4  # prototypes of the winning class reported for a pixel
EXPLAIN_CROPS = 6  # support crops drawn per prototype
