"""Datasets for training: image folders (images.py) and Atari game frames (atari.py)."""
