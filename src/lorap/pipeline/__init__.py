"""How data flows through one compression run (docs/architecture.md draws it):

    config.py      the run's settings (CompressionConfig)
    run.py         the run: plan, checks, whole-model passes, layer walk, metadata, report, write
    sources.py     layer sources: the model in memory (InMemoryLayers) ...
    sharded.py     ... or one layer at a time from safetensors shards (ShardedLayers)
    walk.py        the sequential layer walk, shared by both sources
    statistics.py  what the calibration tokens look like at each projection's input
    layer_step.py  the per-layer step: factorize attention, prune the FFN
    activations.py, staging.py   a streamed run's activations and resumable staging folder
"""
