"""The toy world: procedural shapes, captions, a programmatic judge, and the tiny pretrained SD."""
