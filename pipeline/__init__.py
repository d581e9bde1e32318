"""The Ray side of hero-rollouts: manifests in, WebDataset shards out, and loaders to read them.

Entry points: ``jobs/generate.py`` (``pipeline.cli.main``), ``pipeline.loader.rollout_dataset`` and
``pipeline.loader.random_access``. See docs/pipeline.md.
"""
