"""Datasets: image folders, ImageNette, segmentation folders and ADE20K, MRI slices and NIfTI volumes, transforms."""
