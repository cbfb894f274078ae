"""A run, stage by stage: the recipe and its checks, the plan (stage 1), executing it (stage 2); ``pipeline``
chains plan -> execute -> measure -> report."""
