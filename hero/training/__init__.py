"""Training the shipped toyworld on the procedural world (:mod:`hero.world`): recipes, checkpoints, progress."""
