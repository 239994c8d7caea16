"""The teaching-scale world: procedurally drawn shapes with captions, and the scripts that train a lab on it."""

from .world import (ATTRIBUTES, BACKGROUNDS, COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES, Sample, Thing,
                    all_captions, caption, concept_caption, concept_samples, concept_split, draw, sample, samples,
                    vocabulary)

__all__ = ["ATTRIBUTES", "BACKGROUNDS", "COLOURS", "HELD_OUT", "POSITIONS", "SHAPES", "SIZES", "Sample", "Thing",
           "all_captions", "caption", "concept_caption", "concept_samples", "concept_split", "draw", "sample",
           "samples", "vocabulary"]
