"""CutLER (Wang et al., CVPR 2023), OVDiff's unsupervised instance segmenter, in plain torch + torchvision.

A Cascade Mask R-CNN (ResNet-50 + FPN) that reads the official detectron2 checkpoint ``cutler_cascade_final.pth``
without detectron2. Modules: :mod:`.configs` (sizes and test-time settings, import-light), :mod:`.ops` (box coder,
ROI level assignment, mask pasting), :mod:`.model` (the detector) and :mod:`.checkpoint` (reading, name mapping,
safetensors conversion). Nothing is imported here so that the package costs nothing until it is used.
"""
