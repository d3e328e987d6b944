"""Speech recognition task: the AN4 corpus, its features and its loaders."""
