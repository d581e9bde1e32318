"""The Ray Data stages: CPU prep -> generate (an actor pool; each actor owns a world model and its
accelerator) -> CPU encode. The row format they share is :mod:`pipeline.stages.rows`."""
