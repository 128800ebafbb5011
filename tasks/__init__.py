"""Pipeline stages: each module has ``run(cfg) -> result`` and ``main()`` for ``python -m tasks.<stage>``."""
