"""The run configuration: nested frozen dataclasses that generate the command line, and the presets layered on it.

:mod:`.fields` turns a group's fields into options, :mod:`.presets` reads the preset files, :mod:`.resolve` builds
the one frozen :class:`~.run.RunConfig` of a command line (presets, then the flags given, then the defaults that depend
on the data source).
"""
