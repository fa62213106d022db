from vlv.version import __version__
