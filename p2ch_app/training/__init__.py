"""The trainers: one loop, and the tasks it trains (classifiers, U-Net), with augmentation and mining."""
