"""Segmentation on the patch grid: the Segmenter protocol, the modes and their stages.

``ncut`` (Normalized Cut) and ``ipo`` (Iterative Patch Optimization) are the stages; ``single``,
``instances`` and ``entities`` are the modes built from them; ``registry`` picks one by name;
``scores`` says how much to trust a mask.
"""
