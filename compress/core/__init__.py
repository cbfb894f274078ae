"""The contract between the run and its plugins: artifacts and their facts, typed configs, the registry of passes
and targets, the pass manager, the cache and the identity of code and machine."""
