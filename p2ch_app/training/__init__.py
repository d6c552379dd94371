"""The trainers: one loop, and the tasks it trains (classifiers, U-Net), with augmentation and mining."""

# What --augment may name (training/augment.py applies them); here, so the commands' options need no torch
AUGMENTATIONS = ("flip", "offset", "scale", "rotate", "noise")
FULL_AUGMENTATION = ",".join(AUGMENTATIONS)  # the trainers' default
