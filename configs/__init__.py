"""The shipped training configs, installed as ``personvlad.configs``: the
``*.yaml`` files beside this one.  ``personvlad train --config mars`` (a
name, not a path) reads ``mars.yaml`` from here; see
:func:`personvlad.engine.config.resolve_config`."""
