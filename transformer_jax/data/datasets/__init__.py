"""TFDS dataset builders of our own."""
