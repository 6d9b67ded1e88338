"""Every default of the pipeline, in one place.

Values are the authors' recipe: the paper (sections 3 and 4) and, where it is silent, what the authors' public
code computes, as ``shared/REFERENCE.md`` records it (section numbers below are that page's). Library functions
take these as keyword defaults; the CLI passes only what the user set, so changing a default here changes it
everywhere. Sizes that scale with the model set (support image side, extractor input sizes) live in the model
set's spec instead (models/registry.py).
"""

from __future__ import annotations

# --- 3.2 support set -------------------------------------------------------------------------------------------
PROMPT_TEMPLATE = "A good picture of a {}"
NEGATIVE_PROMPT = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
N_SUPPORT = 32
# A class's support set is generated, cached and clustered whole: its prototypes are built from every image's masked
# features held in memory at once. Above N_WARN images a run says what that costs before it starts; above N_MAX it
# refuses (over 300 times the paper's N, a typing slip far more often than an experiment).
N_WARN = 512
N_MAX = 10_000
# Rough cache bytes per support-image pixel: the PNG (1.5-3 bytes a pixel), the raw flooring residual (3), the
# attribution map and the segmenter's proposal masks (bit-packed, about ten per image). For the size estimate above
# N_WARN only.
SUPPORT_BYTES_PER_PIXEL = 6.0
STEPS = 30
GUIDANCE = 8.0
# REFERENCE 1: diffusers' DPMSolverMultistepScheduler (second order, dpmsolver++) built from SD's own config.
SCHEDULER = "dpmsolver++"
SCHEDULERS = ("dpmsolver++", "ddim")
SEED = 42
# Images are generated in fixed-shape batches of this size (the last one padded) so that an image's bytes never
# depend on which other images shared its batch. On the CPU a batch buys no parallelism while every padded slot
# costs a whole forward pass (and batches of 512-pixel VAE activations cost gigabytes), so batches hold one image.
BATCH_SIZE = 8
CPU_BATCH_SIZE = 1

# --- 3.3 attribution + masks ------------------------------------------------------------------------------------
MASKER = "auto"  # cutler when its checkpoint is here (the paper's), else maskcut with a note
CUTLER_SCORE = 0.35  # CutLER instances kept as proposals score above this (> 0.35, REFERENCE 3)
MASKCUT_TAU = 0.15  # affinity threshold of the normalised cut (CutLER's MaskCut)
MASKCUT_N_MASKS = 3  # rounds of the cut per image
MASKCUT_MAX_IOU = 0.5  # a later round's mask overlapping the previous round's more than this is rejected
MASKCUT_MIN_AREA = 0.01  # ... and so is one covering at most this fraction of the image
MASKCUT_CORNERS = 3  # the side above the mean is reversed when it holds at least this many of the 4 corners
THRESHOLD_FALLBACK_BG = 0.2  # "-CutLER" variant when multi-Otsu cannot split the maps
THRESHOLD_FALLBACK_FG = 0.5
BG_ATTRIBUTION_MAX = 0.2  # bg mask keeps only pixels whose attribution is below this
FG_FALLBACK = 0.5  # fewer than 2 proposals: fg = attribution above this (bg = below BG_ATTRIBUTION_MAX)
BG_ERODE = 1  # erosions of the bg mask with a 3x3 cross, at the support image's resolution

# --- user photos as support (photos.py) -------------------------------------------------------------------------
# Attribution on a real photo: its VAE latent noised to each of these DDPM timesteps, one UNet pass each with the class
# prompt, the class tokens' cross-attention captured as during synthesis and averaged. Chosen by measurement
# (bench/photo_timesteps.py, docs/photos.md): the set whose maps on generated images best reproduce the maps that
# synthesis itself recorded for them.
PHOTO_TIMESTEPS = (300, 500, 700)
PHOTO_NOISE_SEED = 0
# With --support-from train: training images per class (as many as the synthetic support set).
SHOTS = N_SUPPORT

# --- 3.3 prototypes ---------------------------------------------------------------------------------------------
EXTRACTORS = ("sd", "dino", "clip")
K_PARTS = 32
KMEANS_ITERS = 300  # at most (scikit-learn's max_iter); Lloyd stops earlier, see KMEANS_TOL
# Lloyd also stops once the centres move (sum of squared shifts) by at most this times the mean per-feature variance of
# the clustered features, or when no label changes: scikit-learn 1.2's KMeans tol, as the reference runs it.
KMEANS_TOL = 1e-4
KMEANS_SEED = 0
# Binarisation of a support mask after its bilinear resize to an extractor's feature grid: a cell is kept where the
# resized value is above this, i.e. where the mask overlaps the cell's bilinear sample at all (REFERENCE 5).
MASK_GRID_THRESHOLD = 0.0

# --- downloads (ovdiff models fetch) ---------------------------------------------------------------------------------
FETCH_CONNECT_TIMEOUT = 10.0  # seconds to open a connection
FETCH_READ_TIMEOUT = 60.0  # seconds without a byte before a download is given up (OVDIFF_FETCH_TIMEOUT overrides)

# --- numerics ---------------------------------------------------------------------------------------------------
# "auto": the reference's numerics: fp32 on the CPU; on CUDA fp16 SD and pre-filter, fp32 dense CLIP, DINO and matching.
PRECISION = "auto"
PRECISIONS = ("auto", "fast", "fp32", "bf16", "fp16")

# --- 4.1 extractors ---------------------------------------------------------------------------------------------
SD_FEATURE_TIMESTEP = 200
SD_FEATURE_NOISE_SEED = 0

# --- 3.4 segmentation -------------------------------------------------------------------------------------------
SCALES = (448, 336)  # square sliding-window sizes (pixels of the resized image)
STRIDE = 224
WHOLE_IMAGE = True  # the whole resized image is one more window (REFERENCE 6)
SHORT_SIDE = 448  # images are resized (Lanczos) so their short side is this before windowing
BACKGROUND = True  # False = the no-background protocol of paper 4.4 (no bg prototypes)
SEGMENT_BATCH_SIZE = 8  # windows per network forward (fixed shape, last batch padded); CPU_BATCH_SIZE on the CPU
GROUP_SCORE_BYTES = 1 << 30  # a group of images segmented together holds at most about this much of score maps
OVERLAY_ALPHA = 0.7  # weight of the label colours in overlays: a region reads as its legend swatch's colour
OVERLAY_NAME_MIN_AREA = 0.02  # overlays name every connected region covering at least this share of the image
MAX_PIXELS = 100_000_000  # decompression-bomb guard for inputs (a 12000 x 8000 photo is 96 megapixels)

# --- 3.4 filters ------------------------------------------------------------------------------------------------
PREFILTER = True
ETA = 10  # the CLIP pre-filter keeps at most this many classes, then scores all their subsets
PREFILTER_TEMPERATURE = 1.0  # softmax over raw cosines (no CLIP logit scale), REFERENCE 6
PREFILTER_TEMPLATE = "a {}"  # one class in a pre-filter prompt; subsets join these with PREFILTER_JOIN
PREFILTER_JOIN = " and "
# The pre-filter's image: the working image resized to this square (PIL Lanczos), then to CLIP's input size
# (bilinear, no antialiasing), as the reference's CLIP transform does (REFERENCE 6).
PREFILTER_RESIZE = 512
STUFF_THRESHOLD = 0.85  # thing-class bg prototypes this similar to a stuff prototype are dropped
PAMR = False
PAMR_ITERS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)

# --- 4.5 explanations -------------------------------------------------------------------------------------------
EXPLAIN_TOP = 2  # prototypes of the winning class reported per extractor for a pixel
EXPLAIN_CROPS = 6  # support crops drawn per prototype
